"""How the app's inputs treat values that API clients send and no widget would, so that every such value is refused
with a message naming the field instead of gradio's generic error (and a traceback in the server log).

Two layers: simple inputs (sliders, numbers, pickers) pass a value gradio would refuse on to the handler, which
checks it by name; tables and files in a shape gradio cannot read at all are refused before gradio reads them.
"""

from __future__ import annotations

import gradio as gr

from .errors import _clip


def let_the_handlers_check_inputs() -> None:
    """API clients can send what a widget never would (None, out of range, not a choice). Gradio's own check in
    ``preprocess`` answers with a generic error naming no field; with this, such a value reaches the handler, which
    refuses it with "⚠️ <field> = <value> is not allowed; allowed: …" in the status output (every handler checks its
    inputs). Patched on the classes, not on instances (gradio rebuilds a component per session when an event updates
    it) and not through subclasses (gradio writes a .pyi stub beside the module of every component subclass)."""
    for cls in (gr.Slider, gr.Number, gr.Dropdown, gr.Radio, gr.CheckboxGroup):
        strict = cls.preprocess
        if getattr(strict, "lets_the_handler_check", False):
            continue

        def preprocess(self, payload, _strict=strict):
            try:
                return _strict(self, payload)
            except Exception:  # noqa: BLE001 - the handler names the field
                return payload

        preprocess.lets_the_handler_check = True
        cls.preprocess = preprocess


def _payload_problem(block, value, fields: dict) -> str | None:
    """Why an API client's value for a table or file input is not one gradio can read (None if it is)."""
    field = fields.get(block.elem_id, block.label or block.elem_id)
    if isinstance(block, gr.Dataframe):
        headers = value.get("headers") if isinstance(value, dict) else None
        rows = value.get("data") if isinstance(value, dict) else None
        meta = value.get("metadata") if isinstance(value, dict) else None
        if isinstance(headers, list) and isinstance(rows, list) and all(isinstance(r, (list, tuple)) and len(r) == len(headers) for r in rows) \
                and (meta is None or isinstance(meta, dict)):
            return None
        return (f"{field} = {_clip(value)} is not allowed; allowed: a table as {{\"headers\": [column names], \"data\": [rows, each with "
                f"one value per column]}}, e.g. the table that /apply_preset returns")
    if isinstance(block, gr.File) and value is not None:
        from gradio.utils import abspath, get_upload_folder, is_in_or_equal

        path = value.get("path") if isinstance(value, dict) else None
        meta = value.get("meta") if isinstance(value, dict) else None
        uploaded = isinstance(path, str) and isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" \
            and "\x00" not in path and is_in_or_equal(abspath(path), get_upload_folder())
        if not uploaded:  # a server path, or not a file description at all: gradio would refuse it with its own error
            return f"{field} = {_clip(value)} is not allowed; allowed: a file sent with gradio_client's handle_file(path), or None"
        name = str(value.get("orig_name") or path)
        suffixes = [t for t in (block.file_types or []) if t.startswith(".")]
        if suffixes and not name.lower().endswith(tuple(t.lower() for t in suffixes)):
            return f"{field} = {_clip(name)} is not allowed; allowed: a {' or '.join(suffixes)} file"
    return None


def refuse_unreadable_payloads(blocks, fields: dict[str, str]) -> None:
    """A table or file in a shape gradio cannot read (a list of rows without headers, rows of the wrong length, a
    plain string for a file) failed inside gradio: the client got its generic error naming no field, the server log
    a traceback. Checked before gradio reads them, such values are refused by field name (``fields``: elem_id → the
    name the messages use). Patched on one Blocks instance."""
    gradio_check = blocks.validate_inputs

    def validate_inputs(block_fn, inputs):
        gradio_check(block_fn, inputs)
        for block, value in zip(block_fn.inputs, inputs):
            if isinstance(block, (gr.Dataframe, gr.File)) and (problem := _payload_problem(block, value, fields)):
                raise gr.Error(problem, print_exception=False)

    blocks.validate_inputs = validate_inputs
