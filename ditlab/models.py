"""Loading DiT-family pipelines (local folder or hub id) and listing their quantizable linear layers.

Supported layouts (diffusers ``model_index.json``): ``DiTPipeline`` (facebook/DiT-XL-2-256/-512 and the shipped
tiny model) and ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` (transformer + T5 text encoder + VAE).
Weights are read from safetensors only; pickle checkpoints are refused; no remote code is ever executed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "tiny-dit"
SHIPPED_CLASSIFIER = ASSETS / "classifier"
SHIPPED_ALIASES = ("", "shipped", "tiny", "tiny-dit")

FAMILIES = {"DiTPipeline": "dit", "PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart"}
_TRANSFORMER_CLASSES = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYER_KINDS = ("qkv", "out", "fc1", "fc2", "adaLN", "embedder", "final", "other")


@dataclass(eq=False)  # identity semantics: hashable, so per-pipeline results can be cached
class Pipeline:
    """The components of a loaded model. The transformer is shared read-only; quantize a deep copy."""

    transformer: nn.Module
    scheduler_config: dict
    family: str  # "dit" | "pixart"
    source: str
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: object | None = None
    labels: dict[int, str] = field(default_factory=dict)  # class id → name (DiT only)

    @property
    def num_classes(self) -> int:
        """Number of real classes; the null (unconditional) class id equals this number."""
        return int(self.transformer.config.num_embeds_ada_norm or 0) if self.family == "dit" else 0

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def label_name(self, label: int) -> str:
        return self.labels.get(int(label), str(label))


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable linear layer: fully-qualified name, kind, (out, in) shape, parameter count, block index."""

    name: str
    kind: str
    out_features: int
    in_features: int
    params: int
    block: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def layer_kind(name: str) -> str:
    """Classifies a linear by its fully-qualified diffusers name (DiT and PixArt naming)."""
    leaf = name.rsplit(".", 2)
    if "embedder" in name or "caption_projection" in name or ".emb." in name or name.startswith("emb"):
        return "embedder"
    if name.startswith("proj_out"):
        return "final"
    if re.search(r"attn\d?\.to_(q|k|v)$", name) or re.search(r"attn\d?\.(add_)?(q|k|v)_proj$", name):
        return "qkv"
    if re.search(r"attn\d?\.to_out\.0$", name):
        return "out"
    if name.endswith("ff.net.0.proj"):
        return "fc1"
    if name.endswith("ff.net.2"):
        return "fc2"
    if name.endswith("norm1.linear") or name.startswith("adaln_single.linear") or "adaLN" in leaf[-1]:
        return "adaLN"
    return "other"


def _block_index(name: str) -> int | None:
    match = re.match(r"transformer_blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def list_linears(transformer: nn.Module) -> list[LayerInfo]:
    """Every ``nn.Linear`` (or quantized stand-in exposing in/out_features) in module order."""
    layers = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) or getattr(module, "is_quantized_linear", False):
            out_f, in_f = int(module.out_features), int(module.in_features)
            params = out_f * in_f + (out_f if getattr(module, "bias", None) is not None else 0)
            layers.append(LayerInfo(name, layer_kind(name), out_f, in_f, params, _block_index(name)))
    return layers


def default_skip_kinds() -> tuple[str, ...]:
    """Kinds kept in full precision by default (METHODS.md, "Which layers")."""
    return ("embedder", "final", "other")


def _refuse_pickle(folder: Path) -> None:
    if not folder.is_dir():
        return
    if any(p.suffix == ".safetensors" for p in folder.iterdir()):
        return
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(f"{folder}: only pickle checkpoints found ({', '.join(sorted(pickles))}); ditlab loads safetensors only — convert with safetensors.torch.save_file")
    raise ModelLoadError(f"{folder}: no .safetensors weights found")


def resolve_source(source: str | os.PathLike | None) -> Path:
    """A local folder for ``source``: the shipped model, an existing folder, or a hub snapshot (cache or network)."""
    text = "" if source is None else str(source).strip()
    if text in SHIPPED_ALIASES:
        return SHIPPED_MODEL
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{text}: not a folder; pass a diffusers pipeline folder (with model_index.json) or a hub id")
        return path
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"{text}: no such folder (and not a hub id of the form owner/name)")
    return _hub_snapshot(text)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "spiece*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: maybe reachable online
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(f"{repo_id}: hub id not in the local cache and the hub is offline (HF_HUB_OFFLINE); use a local folder or the shipped model")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any network/auth failure becomes one line
        raise ModelLoadError(f"{repo_id}: cannot fetch from the hub ({type(exc).__name__}); offline? use a local folder or the shipped model") from None


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, or ModelLoadError naming the file (missing, not UTF-8, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object (got {type(data).__name__})")
    return data


def read_model_index(folder: Path) -> dict:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json_object(index_path)
    name = index.get("_class_name")
    if not isinstance(name, str) or name not in FAMILIES:
        raise ModelLoadError(f"{folder}: {name!r} is not a supported DiT pipeline; supported: {', '.join(FAMILIES)}")
    return index


def _load_labels(folder: Path, index: dict) -> dict[int, str]:
    labels_path = folder / "labels.json"
    raw = read_json_object(labels_path).get("id2label", {}) if labels_path.is_file() else index.get("id2label") or {}
    try:
        return {int(k): str(v).split(",")[0].strip() for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ModelLoadError(f"{labels_path}: id2label must map class ids (integers) to names") from None


def _from_pretrained(cls, folder: Path, dtype: torch.dtype):
    """``cls.from_pretrained`` from safetensors only; a diffusers model must be of class ``cls`` and get every weight
    from the checkpoint (diffusers would otherwise fill missing weights with random ones and only warn)."""
    _refuse_pickle(folder)
    kwargs = dict(torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    try:
        if not cls.__module__.startswith("diffusers"):
            return cls.from_pretrained(str(folder), **kwargs)
        saved_as = read_json_object(folder / "config.json").get("_class_name")
        if saved_as not in (None, cls.__name__):
            raise ModelLoadError(f"{folder}: holds a {saved_as!r}, not a {cls.__name__}")
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or []) + sorted(k for k, *_ in info.get("mismatched_keys") or [])
        if missing:
            raise ModelLoadError(f"{folder}: {len(missing)} weights of {cls.__name__} are missing from the checkpoint or have "
                                 f"another shape (first: {missing[0]}); refused rather than filled with random values")
        return model
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or mismatched weights: one line, naming the folder
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = re.sub(r"'?(/[^'\s]+)+'?", "…", detail)[:120]  # paths would repeat the folder named in front
        raise ModelLoadError(f"{folder}: cannot load {cls.__name__} ({detail})") from None


def _config_int(config: dict, defaults: dict, key: str, where: Path, *, minimum: int = 1, optional: bool = False) -> int:
    value = config.get(key, defaults.get(key))
    if value is None and optional:
        return 0
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ModelLoadError(f"{where}: {key} = {value!r} is not allowed; allowed: an integer ≥ {minimum}")
    return value


def estimate_params(config: dict, family: str, where: Path = Path("config.json")) -> int:
    """Parameters (and large buffers) of a DiT / PixArt transformer from its config alone — nothing is allocated.

    h = heads × head_dim, L blocks, patch p, C classes, c in / o out channels, d cross-attention width. Per block:
    DiT 19h² + (C + 274)h (attention 4h², MLP 8h², adaLN-zero 6h², its own timestep embedder h² + 256h, label
    table (C+1)h); PixArt 14h² + 2dh + 19h (self- and cross-attention, MLP). Plus patch embedding, the sin-cos
    position table ((S/p)² × h) and the output projections. Within 1 % of the built model for DiT-XL/2 and the tiny
    test models (tests/test_model_sources.py).
    """
    import inspect

    import diffusers

    cls = getattr(diffusers, _TRANSFORMER_CLASSES[family])
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if v.default is not inspect.Parameter.empty}
    get = functools.partial(_config_int, config, defaults, where=where)
    h = get("num_attention_heads") * get("attention_head_dim")
    layers, p, c, size = get("num_layers"), get("patch_size"), get("in_channels"), get("sample_size")
    o = get("out_channels", optional=True) or c
    tokens = (size // p) ** 2
    total = c * p * p * h + h + tokens * h + h * p * p * o + p * p * o  # patch embedding, position table, output
    if family == "dit":
        classes = get("num_embeds_ada_norm", minimum=0, optional=True)
        return total + layers * (19 * h * h + (classes + 274) * h) + 2 * h * h + 2 * h
    d = get("cross_attention_dim")
    caption = get("caption_channels", optional=True) or d
    return total + layers * (14 * h * h + 2 * d * h + 19 * h) + 7 * h * h + 266 * h + caption * h + h * h + 2 * h


def available_memory() -> int | None:
    """Bytes a model may take: $DITLAB_MAX_MODEL_BYTES if set, else the available RAM (psutil or /proc/meminfo)."""
    override = os.environ.get("DITLAB_MAX_MODEL_BYTES", "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ConfigError.invalid("DITLAB_MAX_MODEL_BYTES", override, "a positive number of bytes, e.g. 8e9")
        return int(value)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: fall back to /proc
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(folder: Path, family: str, dtype: torch.dtype) -> int:
    """Estimated bytes of the pipeline (transformer from its config × dtype bytes, other components by file size);
    raises ModelLoadError with the estimate if it exceeds ``available_memory()``. Runs before any weight is allocated."""
    config_path = folder / "transformer" / "config.json"
    config = read_json_object(config_path)
    size = torch.empty((), dtype=dtype).element_size()
    estimate = estimate_params(config, family, config_path) * size
    estimate += sum(f.stat().st_size for part in ("vae", "text_encoder") if (folder / part).is_dir() for f in (folder / part).glob("*.safetensors"))
    limit = available_memory()
    if limit is not None and estimate > limit:
        raise ModelLoadError(f"{folder}: the model needs about {estimate:,} bytes ({estimate / 2**30:.1f} GiB at {str(dtype).replace('torch.', '')}), "
                             f"more than the {limit:,} bytes available (DITLAB_MAX_MODEL_BYTES); refused before loading")
    return estimate


def load_pipeline(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Pipeline:
    """Loads a DiT or PixArt pipeline from a local folder or a hub id (``None``/"shipped" → the shipped tiny DiT).

    Raises ``ModelLoadError`` with a one-line message for a missing folder, a non-DiT model, pickle weights,
    a model too big for the available memory (estimated from its config before loading), or an unreachable hub id.
    """
    import diffusers

    folder = resolve_source(source)
    index = read_model_index(folder)
    family = FAMILIES[index["_class_name"]]
    cls = getattr(diffusers, _TRANSFORMER_CLASSES[family])
    check_fits_in_memory(folder, family, dtype)  # before any weight is allocated
    transformer = _from_pretrained(cls, folder / "transformer", dtype).eval().requires_grad_(False)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise ModelLoadError(f"{folder}: missing scheduler/scheduler_config.json")
    pipe = Pipeline(transformer=transformer, scheduler_config=read_json_object(sched_path), family=family, source=str(source or "shipped"))
    if (index.get("vae") or [None])[0] is not None:
        pipe.vae = _from_pretrained(diffusers.AutoencoderKL, folder / "vae", dtype).eval().requires_grad_(False)
    if family == "dit":
        pipe.labels = _load_labels(folder, index)
    else:
        pipe.text_encoder, pipe.tokenizer = _load_text_encoder(folder, dtype)
    log.info("loaded %s (%s) from %s", index["_class_name"], family, folder)
    return pipe


def _load_text_encoder(folder: Path, dtype: torch.dtype):
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("PixArt pipelines need the 'transformers' package for their T5 text encoder: pip install transformers") from None
    encoder = _from_pretrained(transformers.T5EncoderModel, folder / "text_encoder", dtype).eval().requires_grad_(False)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{folder / 'tokenizer'}: cannot load the tokenizer ({type(exc).__name__})") from None
    return encoder, tokenizer
