"""QDIR: a folder holding a quantized pipeline that loads standalone, with no recalibration, bit-identically.

Layout::

    QDIR/ditlab_qdir.json            manifest: format, version, family, layer specs, sha256 of every other file (written last)
         recipe.json                 the Recipe used (ditlab.config JSON)
         model_index.json            copied / synthesised pipeline index (for the family and the VAE/text encoder)
         labels.json                 class id → name (DiT)
         scheduler/scheduler_config.json
         transformer/config.json     the diffusers transformer config
         transformer/quantized.safetensors   every parameter and buffer of the quantized transformer (QuantLinear
                                     codes, scales, zeros, transforms, low-rank; all non-quantized params)
         vae/, text_encoder/, tokenizer/     copied from the source when the pipeline has them

Writes are atomic and durable: everything goes to a temporary folder beside ``out_dir``, is fsynced, and is renamed into place with
``os.replace`` once complete (an existing QDIR is swapped out in one step on Linux: ``renameat2(RENAME_EXCHANGE)``),
so a crash never leaves a half-written QDIR: ``out_dir`` is the old QDIR, the new one, or (no old one) absent. A killed
writer's stray ``.name.tmp-PID-*`` folder is removed by the next save to the same ``out_dir``. A disk error (full,
read-only) raises ``WriteError``: one line naming the output, e.g. "cannot write …: no space left on device".

Loading checks every file against the manifest's checksums before it trusts any of them (recipe, configs, labels,
weights, VAE/text encoder), so an edited or corrupt file is a ``ModelLoadError`` naming it, never a silently different
model. Version 1 manifests (ditlab before per-file checksums) hold the weights' checksum only; they still load, with
only the weights checked. The checksums catch corruption and edits of the files, not a forger who rewrites the manifest.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .atomic import file_in_the_way, fsync_path, fsync_tree, remove_left_by_dead_processes, save_safetensors
from .config import Recipe, load_recipe
from .errors import ConfigError, DitlabError, ModelLoadError
from .models import (FAMILIES, SHIPPED_ALIASES, SHIPPED_MODEL, Pipeline, _from_pretrained, check_fits_in_memory, _load_labels, _load_text_encoder,
                     read_json_object, read_model_index, resolve_source)
from .nn import MODULE_CODECS, MODULE_TYPES, codec_for

log = logging.getLogger(__name__)

MANIFEST = "ditlab_qdir.json"
FORMAT = "ditlab-qdir"
QDIR_VERSION = 2  # 2: "files" holds the sha256 of every file; 1: "sha256" of the weights only (still read)
READ_VERSIONS = (1, 2)
WEIGHTS = "transformer/quantized.safetensors"
RECIPE = "recipe.json"
CONFIG = "transformer/config.json"
SCHEDULER = "scheduler/scheduler_config.json"
_ALWAYS_WRITTEN = (RECIPE, "model_index.json", "labels.json", SCHEDULER, CONFIG, WEIGHTS)  # a version 2 manifest lists each
_TRANSFORMERS = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart"}
_PIPELINES = {"dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline"}


class WriteError(DitlabError, OSError):
    """An output could not be written (disk full, read-only, no permission): one line naming the output."""

    @classmethod
    def of(cls, path: str | os.PathLike, exc: OSError) -> "WriteError":
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        hint = " (free some space or choose another output folder)" if exc.errno == errno.ENOSPC else ""
        return cls(exc.errno, f"cannot write {path}: {reason}{hint}")

    def __str__(self) -> str:
        return self.strerror


def is_qdir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder with a QDIR manifest (what ``load_quantized`` reads)."""
    return (Path(path) / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    """Relative path (with "/") → sha256 of every file under ``folder`` except the manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {rel: _sha256(p) for p in files if (rel := p.relative_to(folder).as_posix()) != MANIFEST}


def _verify(folder: Path, manifest: dict, under: str = "") -> None:
    """Checks each file the manifest lists (only those whose path starts with ``under``) against its sha256: a
    missing or changed file is a ModelLoadError naming it. Version 1 manifests list only the weights."""
    files = manifest["files"] if manifest["version"] >= 2 else {manifest.get("weights", WEIGHTS): manifest.get("sha256")}
    for rel, digest in files.items():
        if not rel.startswith(under):
            continue
        path = folder / rel
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing (the QDIR is incomplete; export it again)")
        if _sha256(path) != digest:
            raise ModelLoadError(f"{path}: checksum mismatch (the file is corrupt or was modified)")


def _layer_specs(model: nn.Module) -> dict[str, dict]:
    """Layer name → spec of every replacement module: ``spec()`` of a registered ditlab type, or the spec of a
    module saved through its ``ModuleCodec`` (marked ``"codec": True``; e.g. bitsandbytes layers)."""
    specs = {}
    for name, module in model.named_modules():
        registered = type(module).__name__ in MODULE_TYPES and callable(getattr(module, "spec", None))
        codec = codec_for(module)
        if codec is not None:
            specs[name] = {**codec.spec(module), "type": type(module).__name__, "codec": True}
        elif registered:
            specs[name] = module.spec()
        elif getattr(module, "is_quantized_linear", False) or type(module).__module__.startswith("bitsandbytes"):
            raise DitlabError(f"cannot save layer {name!r}: {type(module).__name__} is not a registered QDIR module type "
                              f"(registered: {', '.join(MODULE_TYPES)}; see ditlab.nn.register_module_type)")
    return specs


def _tensors(model: nn.Module, specs: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), contiguous and owning its storage (safetensors' rule); a
    codec layer's tensors are its codec's ``tensors()`` under the layer's prefix instead of its raw attributes."""
    out, seen = {}, set()
    coded = [n for n, s in (specs or {}).items() if s.get("codec")]
    for layer in coded:
        module = model.get_submodule(layer)
        for key, t in codec_for(module).tensors(module).items():
            out[f"{layer}.{key}"] = t.detach().contiguous().clone()
    prefixes = tuple(f"{n}." for n in coded)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if prefixes and name.startswith(prefixes):
            continue
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen or t.numel() == 0 else t
        seen.add(key)
    return out


def _write_components(source, folder: Path) -> tuple[str, dict]:
    """Scheduler config, labels, model index and VAE/text encoder folders of the source pipeline → ``folder``."""
    pipe = source if isinstance(source, Pipeline) else None
    src = None
    if pipe is None:
        src = resolve_source(source)
    elif str(pipe.source).strip() in SHIPPED_ALIASES or Path(str(pipe.source)).expanduser().is_dir():
        src = resolve_source(pipe.source)  # a local folder: copy its files (never a hub lookup for a loaded pipeline)
    try:
        index = read_model_index(src) if src is not None else {"_class_name": _PIPELINES[pipe.family]}
    except DitlabError:
        if pipe is None:
            raise
        src, index = None, {"_class_name": _PIPELINES[pipe.family]}
    family = FAMILIES[index["_class_name"]]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    sched = pipe.scheduler_config if pipe is not None else json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(sched), indent=2))
    labels = pipe.labels if pipe is not None else (_load_labels(src, index) if family == "dit" else {})
    (folder / "labels.json").write_text(json.dumps({"id2label": {str(k): v for k, v in sorted(labels.items())}}, indent=2))
    for part in ("vae", "text_encoder", "tokenizer"):
        if src is not None and (src / part).is_dir():
            shutil.copytree(src / part, folder / part)
        elif pipe is not None and getattr(pipe, part, None) is not None:
            getattr(pipe, part).save_pretrained(folder / part)
    if pipe is not None and pipe.vae is not None:
        index.setdefault("vae", ["diffusers", "AutoencoderKL"])
    index.pop("id2label", None)  # labels.json is the one source of labels
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return family, index


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(out: Path) -> None:
    """Removes the temporary folders that killed writers left beside ``out`` (their process no longer runs)."""
    for path in remove_left_by_dead_processes(out.parent.glob(f".{out.name}.tmp-*"), lambda p: p.name.rsplit(".tmp-", 1)[1].split("-")[0]):
        log.info("removed %s, left by a writer that was killed", path)


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Atomically moves the finished ``tmp`` folder to ``out`` (replacing an existing QDIR only if allowed)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    if not is_qdir(out):
        raise DitlabError(f"{out}: exists and is not a QDIR; refusing to overwrite it (choose another output folder)")
    if not overwrite:
        raise DitlabError(f"{out}: a QDIR already exists there; pass overwrite=True (CLI: --overwrite) to replace it")
    if _exchange(tmp, out):  # out is the new QDIR, tmp the old one: there is never a moment without a QDIR at out
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)  # a crash between these two renames leaves the old QDIR intact under `old`
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_folders(out: Path) -> None:
    """WriteError if a regular file stands where ``out``'s parent folders must be (mkdir would say "file exists")."""
    if (path := file_in_the_way(out)) is not None:
        raise WriteError(errno.ENOTDIR, f"cannot write {out}: {path} is a file, not a folder (choose another output folder)")


def save_quantized(model: nn.Module, recipe: Recipe | str | None, source, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   extra: dict | None = None) -> Path:
    """Writes a quantized transformer ``model`` (from ``quantize_``) as a standalone QDIR at ``out_dir``.

    recipe: the Recipe (or preset/JSON path) it was quantized with (default: ``model.ditlab_recipe``). source: the
    FP ``Pipeline`` or its folder / hub id, for the scheduler, labels and VAE/text encoder. extra: JSON-able facts
    to keep in the manifest (e.g. the QuantReport totals). Returns the QDIR path.
    """
    recipe = load_recipe(recipe if recipe is not None else getattr(model, "ditlab_recipe", None) or "fp")
    cls_name = type(model).__name__
    if cls_name not in _TRANSFORMERS:
        raise DitlabError(f"cannot save a {cls_name}: QDIR supports {', '.join(_TRANSFORMERS)}")
    out = Path(out_dir).expanduser().resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _check_folders(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp.mkdir()
        specs = _layer_specs(model)
        family, _ = _write_components(source, tmp)
        (tmp / "transformer").mkdir()
        model.save_config(tmp / "transformer")
        save_safetensors(_tensors(model, specs), tmp / WEIGHTS, metadata={"format": "pt", "producer": f"ditlab {__version__}"})
        (tmp / RECIPE).write_text(recipe.to_json() + "\n")
        manifest = {"format": FORMAT, "version": QDIR_VERSION, "ditlab_version": __version__, "family": family,
                    "transformer_class": cls_name, "recipe": recipe.name, "layers": specs, "weights": WEIGHTS,
                    "files": _checksums(tmp), "source": portable_source(source.source if isinstance(source, Pipeline) else source),
                    "extra": extra or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence marks a complete QDIR
        fsync_tree(tmp)  # on disk before the rename makes it visible: a power loss never leaves a QDIR of empty files
        _place(tmp, out, overwrite)
        fsync_path(out.parent)  # the rename itself
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, DitlabError):
            raise WriteError.of(out, exc) from exc
        raise
    log.info("saved QDIR %s (%d quantized layers, recipe %s)", out, len(specs), recipe.name)
    return out


def portable_source(source) -> str:
    """The FP source as the manifest records it, valid from any working directory: "shipped" for the shipped
    model (under any alias or path), an absolute path for another local folder, a hub id unchanged."""
    text = str(source or "").strip()
    if text in SHIPPED_ALIASES:
        return "shipped"
    path = Path(text).expanduser()
    if not path.is_dir():
        return text  # a hub id
    path = path.resolve()
    return "shipped" if path == SHIPPED_MODEL.resolve() else str(path)


def fp_source(qdir: str | os.PathLike) -> str:
    """The FP model a QDIR was quantized from, loadable from any working directory. QDIRs written before sources were
    recorded portably may hold a path relative to where they were made (e.g. "assets/tiny-dit"): it is looked up
    from the working directory, then the ditlab checkout, then the QDIR's folder; otherwise returned as recorded
    (a hub id)."""
    folder = Path(qdir).expanduser()
    recorded = str(_read_manifest(folder).get("source") or "shipped").strip()
    path = Path(recorded).expanduser()
    if recorded in SHIPPED_ALIASES or path.is_absolute():
        return portable_source(recorded)
    checkout = SHIPPED_MODEL.resolve().parent.parent
    for base in (Path.cwd(), checkout, folder.resolve().parent):
        if (base / path).is_dir():
            return portable_source(base / path)
    return recorded


def _mismatch(config_path: Path, detail: str) -> ModelLoadError:
    """The transformer config, the manifest's layer specs and the stored tensors disagree (an edited file, or a corrupt
    QDIR); both files are named, as either may be the edited one."""
    return ModelLoadError(f"{config_path} and {MANIFEST}'s layer specs do not match the stored tensors ({detail}); the QDIR is "
                          "corrupt or was edited")


def _parent_of(model: nn.Module, name: str, config_path: Path) -> tuple[nn.Module, str]:
    """(module holding ``name``, attribute name); a mismatch error naming the config if the model has no such place."""
    parent, _, leaf = name.rpartition(".")
    try:
        return (model.get_submodule(parent) if parent else model), leaf
    except AttributeError:
        raise _mismatch(config_path, f"the model it describes has no layer {name!r}") from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, config_path: Path) -> None:
    module, leaf = _parent_of(model, name, config_path)
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if old is not None and old.shape != tensor.shape:
        raise _mismatch(config_path, f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(old.shape)}")
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise _mismatch(config_path, f"tensor {name!r} has no place in the model")


def _inside(rel) -> bool:
    """Whether ``rel`` is a relative path that stays inside the QDIR."""
    return isinstance(rel, str) and bool(rel) and not rel.startswith("/") and ".." not in rel.split("/")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not is_qdir(folder):
        raise ModelLoadError(f"{folder}: not a QDIR (no {MANIFEST}); create one with `python -m ditlab quantize --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or type(version) is not int or version not in READ_VERSIONS:
        raise ModelLoadError(f"{folder}: unsupported QDIR format {manifest.get('format')!r} version {version!r} "
                             f"(this ditlab reads {FORMAT} versions {', '.join(map(str, READ_VERSIONS))}; a newer ditlab may have written it)")
    if manifest.get("transformer_class") not in _TRANSFORMERS:
        raise ModelLoadError(f"{folder}: transformer class {manifest.get('transformer_class')!r} not supported")
    if version >= 2:
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(_inside(k) and isinstance(v, str) for k, v in files.items()):
            raise ModelLoadError(f"{path}: \"files\" must map paths inside the QDIR to sha256 checksums")
        unlisted = [rel for rel in (*_ALWAYS_WRITTEN, manifest.get("weights", WEIGHTS)) if rel not in files]
        if unlisted:
            raise ModelLoadError(f"{path}: no checksum for {unlisted[0]} (the manifest is incomplete; export the QDIR again)")
    return manifest


def _read_recipe(path: Path) -> Recipe:
    try:
        return Recipe.from_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (the QDIR is incomplete; export it again)") from None
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: not a valid recipe ({exc})") from None


def load_quantized_transformer(folder: str | os.PathLike, verify: bool = True) -> nn.Module:
    """The quantized transformer of a QDIR: built on the meta device, quantized modules swapped in from their
    specs, then every tensor assigned from the safetensors file (no random init, no recalibration). ``verify``
    checks the transformer's files against the manifest's checksums first."""
    import diffusers
    from safetensors.torch import load_file

    from . import methods  # noqa: F401 - importing the method modules registers their module types (e.g. VQLinear)

    folder = Path(folder)
    manifest = _read_manifest(folder)
    weights, config_path = folder / manifest.get("weights", WEIGHTS), folder / CONFIG
    if verify:
        _verify(folder, manifest, under="transformer/")
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: missing (the QDIR is incomplete; export it again)")
    cls = getattr(diffusers, manifest["transformer_class"])
    check_fits_in_memory(folder, _TRANSFORMERS[manifest["transformer_class"]], torch.float32)  # an uploaded config may claim anything
    try:
        with torch.device("meta"):  # no allocation, no random init: every tensor is assigned from the file below
            model = cls.from_config(read_json_object(config_path))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises anything on a config with wrong values
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "rejected by diffusers"
        raise ModelLoadError(f"{config_path}: not a valid {cls.__name__} config ({detail})") from None
    try:
        tensors = load_file(str(weights))
    except Exception:  # noqa: BLE001 - truncated or overwritten (reached with verify=False or a version 1 manifest)
        raise ModelLoadError(f"{weights}: not a readable safetensors file (corrupt or truncated)") from None
    for name, spec in manifest["layers"].items():  # skeletons on CPU (placeholders, overwritten below)
        kind = spec.get("type")
        parent, leaf = _parent_of(model, name, config_path)
        if spec.get("codec"):  # built whole by its codec from its own tensors (e.g. bitsandbytes layers)
            if kind not in MODULE_CODECS:
                raise ModelLoadError(f"{folder}: layer {name!r} has module type {kind!r}; known codecs: {', '.join(MODULE_CODECS)}")
            prefix = f"{name}."
            own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            setattr(parent, leaf, MODULE_CODECS[kind].build(spec, own))
            continue
        if kind not in MODULE_TYPES:
            raise ModelLoadError(f"{folder}: layer {name!r} has module type {kind!r}; known: {', '.join(MODULE_TYPES)}")
        setattr(parent, leaf, MODULE_TYPES[kind].from_spec(spec))
    for name, tensor in tensors.items():
        _assign(model, name, tensor, config_path)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise _mismatch(config_path, f"{len(left)} tensors of the model it describes are not in {weights.name}, first: {left[0]}")
    return model.eval().requires_grad_(False)


def load_quantized(qdir: str | os.PathLike) -> tuple[Pipeline, Recipe]:
    """(Pipeline with the quantized transformer, Recipe) from a QDIR written by ``save_quantized``; every file is
    checked against the manifest's checksums first (a missing, corrupt or edited file is a ModelLoadError naming it)."""
    import diffusers

    folder = Path(qdir).expanduser()
    manifest = _read_manifest(folder)
    _verify(folder, manifest)
    recipe = _read_recipe(folder / RECIPE)
    transformer = load_quantized_transformer(folder, verify=False)  # verified above
    transformer.ditlab_recipe = recipe
    index = read_model_index(folder)
    family = manifest["family"]
    pipe = Pipeline(transformer=transformer, scheduler_config=read_json_object(folder / SCHEDULER), family=family, source=str(folder))
    dtype = next(transformer.parameters()).dtype
    if (index.get("vae") or [None])[0] is not None:
        pipe.vae = _from_pretrained(diffusers.AutoencoderKL, folder / "vae", dtype).eval().requires_grad_(False)
    if family == "dit":
        pipe.labels = _load_labels(folder, index)
    else:
        pipe.text_encoder, pipe.tokenizer = _load_text_encoder(folder, dtype)
    log.info("loaded QDIR %s (recipe %s, %d quantized layers)", folder, recipe.name, len(manifest["layers"]))
    return pipe, recipe
