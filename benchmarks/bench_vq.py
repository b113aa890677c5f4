"""Vector-quantization benchmarks; each prints a markdown table.

  python benchmarks/bench_vq.py kmeans-xl [--bits 2] [--limit N] [--storage-only]
      k-means initialisation (k-means++ + ≤ 100 Lloyd updates) of every nn.Linear of DiT-XL/2 (random weights,
      N(0, 0.02²), shapes from ditlab.testing.dit_xl_2_config() built on the meta device), one layer at a time:
      seconds per layer kind, total, peak resident memory of the process, and the stored bytes (indices, packed at
      6 bits when k ≤ 64, + fp16 codebooks) over fp16 bytes. Goal: ≤ 15 minutes on 2 cores.
      --storage-only: only the bytes table (no k-means; the storage layout does not depend on the weights).
  python benchmarks/bench_vq.py quality [--n-per-label 10] [--steps 25] [--seed 0] [--out docs/VQ4DIT.md]
      the shipped tiny DiT: FP vs 2-bit RTN (group 64) vs k-means vs VQ4DiT at 2 and 3 bits; class accuracy and
      Fréchet distance of the shipped classifier, PSNR vs FP, packed bytes / fp16 bytes, quantize and calibration time.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditlab import vq  # noqa: E402
from ditlab.config import LayerConfig, Recipe, get_preset  # noqa: E402
from ditlab.methods.kmeans import kmeans_init, layer_params  # noqa: E402

log = logging.getLogger("bench_vq")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _machine() -> str:
    import os
    import platform

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {load}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def kmeans_xl(bits: int, limit: int | None, storage_only: bool = False) -> str:
    """Markdown table of the k-means initialisation time of all DiT-XL/2 linears, with memory and stored bytes."""
    from diffusers import DiTTransformer2DModel

    from ditlab.models import list_linears
    from ditlab.testing import dit_xl_2_config

    with torch.device("meta"):
        model = DiTTransformer2DModel(**dit_xl_2_config())
    layers = list_linears(model)[:limit]
    cfg = LayerConfig(method="kmeans", w_bits=bits, a_bits=16)
    start = _machine()
    base = _peak_rss_mb()
    rows: dict[str, list] = {}
    stored = fp16 = 0
    t_all = time.perf_counter()
    for i, info in enumerate(tqdm(layers, desc="k-means DiT-XL/2", disable=storage_only)):
        p = layer_params(cfg, info.out_features, info.in_features)
        sec = 0.0
        if storage_only:  # the layout is fixed by the shape and (k, d)
            layer = vq.VQLinear(info.in_features, info.out_features, num_codes=p.k, d=p.d, bias=False)
        else:
            w = torch.randn(info.out_features, info.in_features, generator=torch.Generator().manual_seed(i)) * 0.02
            t0 = time.perf_counter()
            codebook, assignments = kmeans_init(w, p, desc=info.name)
            sec = time.perf_counter() - t0
            layer = vq.VQLinear.from_parts(assignments, codebook, None)
            del w, codebook, assignments
        stored += layer.weight_bytes()
        fp16 += 2 * info.out_features * info.in_features
        if not storage_only:  # a line per layer, so that an interrupted run still says how far it got
            log.info("%d/%d %s %d×%d: %.1f s (elapsed %.0f s, peak RSS %.0f MB)", i + 1, len(layers), info.name,
                     info.out_features, info.in_features, sec, time.perf_counter() - t_all, _peak_rss_mb())
        r = rows.setdefault(f"{info.kind} {info.out_features}×{info.in_features}", [0, 0.0, p.k, p.d, layer.index_bits])
        r[0] += 1
        r[1] += sec
    total = time.perf_counter() - t_all
    lines = [f"k-means init, DiT-XL/2 random weights, {bits}-bit (k, d from w_bits, capped), {len(layers)} linears", "",
             f"machine at start: {start}", f"machine at end:   {_machine()}", "",
             "| layers | count | k | d | index bits | seconds (sum) | s / layer |", "|---|---|---|---|---|---|---|"]
    if storage_only:
        lines[-2:] = ["| layers | count | k | d | index bits |", "|---|---|---|---|---|"]
    for name, (count, sec, k, d, ib) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        timing = "" if storage_only else f" {sec:.1f} | {sec / count:.2f} |"
        lines.append(f"| {name} | {count} | {k} | {d} | {ib} |{timing}")
    lines += ["", f"stored {stored / 2**20:.1f} MiB vs fp16 {fp16 / 2**20:.1f} MiB: {stored / fp16:.4f}× (indices + fp16 codebooks)"]
    if not storage_only:
        lines += [f"total {total:.0f} s ({total / 60:.1f} min); peak RSS {_peak_rss_mb():.0f} MB (before k-means {base:.0f} MB)"]
    return "\n".join(lines)


RTN2 = Recipe(default=LayerConfig(method="rtn", w_bits=2, a_bits=16, w_group_size=64), name="w2a16-rtn-g64")
DEFAULT_RECIPES = ("w2-kmeans", "w2-vq4dit", "w2a16-rtn-g64", "w3-kmeans", "w3-vq4dit")


def _quality_recipes(names, params: dict) -> list[Recipe]:
    """Recipes by name (presets or w2a16-rtn-g64); ``params`` is merged into the params of vq4dit recipes."""
    out = []
    for name in names:
        r = RTN2 if name == RTN2.name else get_preset(name)
        if params and r.default.method == "vq4dit":
            extra = ",".join(f"{k}={v}" for k, v in params.items())
            r = r.replace(default=r.default.replace(params={**r.default.params, **params}), name=f"{name} ({extra})")
        out.append(r)
    return out


def quality(n_per_label: int, steps: int, seed: int, names=DEFAULT_RECIPES, params: dict | None = None) -> str:
    """Markdown table: the shipped model at FP and under each VQ / RTN recipe."""
    from ditlab import api, metrics
    from ditlab.methods.vq4dit import quantize_vq4dit

    pipe = api.load("shipped")
    labels = api.eval_labels(pipe.num_classes, n_per_label)
    fp = api.generate(pipe, labels, steps=steps, seed=seed, progress=False)
    m = api.content_metrics(fp.images, labels)
    head = ["| recipe | class acc | FD | PSNR vs FP (dB) | bytes / fp16 | quantize s | calibrate s | calib steps |",
            "|---|---|---|---|---|---|---|---|",
            f"| fp | {m['class_acc']:.2%} | {m['fd']:.2f} | – | 1.000 | – | – | – |"]
    for recipe in _quality_recipes(names, params or {}):
        model, report = quantize_vq4dit(pipe, recipe)
        calib = model.ditlab_calibration
        out = api.generate(pipe, labels, steps=steps, seed=seed, transformer=model, progress=False)
        q = api.content_metrics(out.images, labels)
        head.append(f"| {recipe.name} | {q['class_acc']:.2%} | {q['fd']:.2f} | {metrics.psnr(out.images, fp.images):.2f} | "
                    f"{report.ratio:.4f} | {report.seconds - calib.seconds:.1f} | {calib.seconds:.1f} | {len(calib.steps)} |")
        log.info("%s", head[-1])
    return "\n".join(head)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("kmeans-xl")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="only the first N linears (a quick look)")
    p.add_argument("--storage-only", action="store_true", help="only the stored-bytes table (no k-means)")
    q = sub.add_parser("quality")
    q.add_argument("--n-per-label", type=int, default=10)
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="also append the table to this markdown file")
    q.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    q.add_argument("--params", type=json.loads, default=None, help='JSON merged into vq4dit params, e.g. \'{"iterations": 16}\'')
    for sp in (p, q):
        sp.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.cmd == "kmeans-xl":
        table = kmeans_xl(args.bits, args.limit, args.storage_only)
    else:
        table = quality(args.n_per_label, args.steps, args.seed, args.recipes, args.params)
        if args.out:
            cmd = "python benchmarks/bench_vq.py " + " ".join(sys.argv[1:] if argv is None else argv)
            with open(args.out, "a") as f:
                f.write(f"\nCommand: `HF_HUB_OFFLINE=1 {cmd}`\n\n{table}\n")
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
