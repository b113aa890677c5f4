"""ditlab — the Gradio app. Layout and wiring only: every handler is a short call into ``ditlab.api``.

Run: ``python app.py`` (host/port from DITLAB_HOST / DITLAB_PORT, default 127.0.0.1:7860).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from ditlab import api  # noqa: E402
from ditlab.errors import DitlabError  # noqa: E402

PIPE = api.load("shipped")  # loaded once, shared read-only by every session
LABEL_CHOICES = api.label_choices(PIPE)


def generate(labels: list[int], n_per_label: int, seed: int, steps: int, guidance: float, progress=gr.Progress(track_tqdm=True)):
    """Handler: a grid with one row per chosen class."""
    try:
        grid, info = api.generate_grid(PIPE, labels, int(n_per_label), steps=int(steps), guidance=float(guidance), seed=int(seed))
    except DitlabError as exc:
        raise gr.Error(str(exc)) from None
    return grid, f"{info['n_images']} images · seed {info['seed']} · {info['seconds']} s · {info['path']}"


def build() -> gr.Blocks:
    with gr.Blocks(title="ditlab") as demo:
        gr.Markdown("# ditlab — post-training quantization lab for Diffusion Transformers\n"
                    f"Model: the shipped tiny DiT (`{PIPE.source}`), {len(api.layers(PIPE))} linear layers, classes: "
                    + ", ".join(name for name, _ in LABEL_CHOICES))
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    labels = gr.CheckboxGroup(LABEL_CHOICES, value=[v for _, v in LABEL_CHOICES], label="classes", elem_id="labels")
                    n_per_label = gr.Slider(1, 16, value=6, step=1, label="images per class", elem_id="n_per_label")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    steps = gr.Slider(1, 100, value=api.DEFAULT_STEPS, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 10.0, value=api.DEFAULT_GUIDANCE, step=0.5, label="CFG scale", elem_id="guidance")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    grid = gr.Image(label="samples (one row per class)", type="numpy", elem_id="grid", format="png")
                    status = gr.Markdown(elem_id="status")
        inputs = [labels, n_per_label, seed, steps, guidance]
        run.click(generate, inputs, [grid, status], api_name="generate", concurrency_limit=2)
        demo.load(generate, inputs, [grid, status], api_name=False)
    return demo


demo = build()
demo.queue(max_size=32, default_concurrency_limit=2)

if __name__ == "__main__":
    demo.launch(
        server_name=os.environ.get("DITLAB_HOST", "127.0.0.1"),
        server_port=int(os.environ.get("DITLAB_PORT", "7860")),
        share=False,
        footer_links=["api"],
    )
