"""Load a CLIP model from any checkpoint this project meets, and the config record that makes ours
self-describing.

Four kinds of checkpoint are read, all with `safe_torch_load` (weights_only=True) or safetensors (no code
runs):

* OpenAI / OpenCLIP layout (.pt, .bin, .safetensors): a dict of tensors, optionally under "state_dict";
  the architecture is inferred from the tensors (`clip_train.models.openai_layout`).
* Our trainer's Lightning checkpoints (.ckpt): {"state_dict": {"model.<name>": tensor, "loss.…": …, …},
  "clip_config": clip_config_to_dict(config), "pytorch-lightning_version": …, …}. The model's keys start
  with "model." (plus "_orig_mod." when it was compiled); everything else (loss, optimiser state, loops) is
  ignored.
* A plain model file: {"clip_config": clip_config_to_dict(config), "state_dict": model.state_dict()}, as
  written by `save_model`.
* A Hugging Face `CLIPModel` folder (config.json + model.safetensors, or pytorch_model.bin), as
  `clip_train.export` writes it, or its weights file with the config.json beside it
  (`clip_train.models.huggingface_layout`).

Any other folder is refused with what to pass instead (`check_checkpoint_path`).

A Lightning checkpoint written before the trainer recorded "clip_config" still loads: its architecture is
inferred from the tensors like an OpenAI file, with a warning, and the activation taken to be our default.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from clip_train.models import CLIP, CLIPConfig, ModifiedResNetConfig, TextTransformerConfig
from clip_train.models.configs import VisionTransformerConfig
from clip_train.models.huggingface_layout import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    has_huggingface_names,
    model_from_huggingface,
)
from clip_train.models.openai_layout import (
    CheckpointError,
    check_checkpoint_file,
    checkpoint_file_problem,
    config_from_openai_state_dict,
    load_openai_checkpoint,
    load_openai_state_dict,
    read_openai_state_dict,
    safe_torch_load,
)

CONFIG_KEY = "clip_config"
_MODEL_PREFIX = "model."
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
_VISION_TYPES: dict[str, type] = {"vit": VisionTransformerConfig, "resnet": ModifiedResNetConfig}
EXPECTED_KINDS = (
    "an OpenAI/OpenCLIP CLIP state dict (.pt/.bin/.safetensors), a clip_train Lightning checkpoint (.ckpt), "
    "a file written by clip_train.checkpoints.save_model, or a Hugging Face CLIPModel folder "
    "(config.json + model.safetensors)"
)
# A Hugging Face folder's weights, in the order transformers prefers them.
_WEIGHTS_FILES = (WEIGHTS_FILE, "pytorch_model.bin")
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_SUGGESTED_FILES = 3

__all__ = [
    "CheckpointError",
    "check_checkpoint_path",
    "clip_config_from_dict",
    "clip_config_to_dict",
    "load_model",
    "save_model",
]


# ------------------------------------------------------------------------------------- config record


def clip_config_to_dict(config: CLIPConfig) -> dict[str, Any]:
    """A plain, JSON/YAML-safe dict of the config (lists, not tuples), with the image tower's kind under
    `vision["type"]` ("vit" or "resnet") so that reading it back never has to guess."""
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"expected a CLIPConfig, got {type(config).__name__}")
    record = dataclasses.asdict(config)
    vision_type = next(name for name, cls in _VISION_TYPES.items() if isinstance(config.vision, cls))
    record["vision"] = {"type": vision_type, **_listify(record["vision"])}
    record["text"] = _listify(record["text"])
    return record


def clip_config_from_dict(record: Mapping[str, Any]) -> CLIPConfig:
    """The inverse of `clip_config_to_dict`. Raises `CheckpointError` naming any unknown or missing field."""
    if not isinstance(record, Mapping):
        raise CheckpointError(f"a clip_config record must be a mapping, got {type(record).__name__}")
    fields = dict(record)
    vision = dict(fields.get("vision") or {})
    vision_type = vision.pop("type", None)
    if vision_type not in _VISION_TYPES:
        raise CheckpointError(
            f"clip_config.vision.type must be one of {sorted(_VISION_TYPES)}, got {vision_type!r}"
        )
    try:
        fields["vision"] = _VISION_TYPES[vision_type](**vision)
        fields["text"] = TextTransformerConfig(**dict(fields.get("text") or {}))
        return CLIPConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid clip_config record: {exc}") from exc


def _listify(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------- files


def save_model(model: CLIP, path: str | Path) -> Path:
    """Write the model's own state dict with its config record (`torch.save`); `load_model` reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({CONFIG_KEY: clip_config_to_dict(model.config), "state_dict": state}, path)
    return path


def load_model(path: str | Path, *, quick_gelu: bool | None = None) -> CLIP:
    """A float32 CLIP model in eval mode from any of the four kinds of checkpoint (see the module docstring).

    `quick_gelu` only matters for OpenAI-layout files, which do not record the activation (None: from our
    .safetensors metadata, else True as in OpenAI's release). Raises FileNotFoundError for a missing path
    and `CheckpointError` (naming the path and what was expected) for a file of the wrong kind or a folder
    that is not a Hugging Face CLIPModel folder.
    """
    path = Path(path)
    if path.is_dir():
        return _load_huggingface(huggingface_weights_in(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            if has_huggingface_names(_safetensors_keys(path)):
                return _load_huggingface(path)
            return load_openai_checkpoint(path, quick_gelu=quick_gelu)
        obj = _torch_load(path)
        if isinstance(obj, Mapping) and CONFIG_KEY in obj:
            return _load_own(obj, path)
        if _is_lightning(obj):
            return _load_lightning_without_config(obj, path)
        if isinstance(obj, Mapping) and has_huggingface_names(obj):
            return _load_huggingface(path)
        return load_openai_checkpoint(path, quick_gelu=quick_gelu)
    except CheckpointError as exc:
        if str(path) in str(exc):
            raise
        raise CheckpointError(f"{path}: {exc}. Expected {EXPECTED_KINDS}") from exc


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` when `load_model` may read it, judged without loading the weights: FileNotFoundError for a
    missing path; `CheckpointError` for a file whose first bytes are no checkpoint's
    (`check_checkpoint_file`), a Hugging Face weights file without its config.json, or a folder that is not
    a Hugging Face CLIPModel folder (saying what to pass instead)."""
    path = Path(path)
    if path.is_dir():
        huggingface_weights_in(path)
        return path
    check_checkpoint_file(path)
    if path.suffix == ".safetensors" and has_huggingface_names(_safetensors_keys(path)):
        _huggingface_config_file(path)
    return path


def huggingface_weights_in(folder: str | Path) -> Path:
    """The weights file of a Hugging Face CLIPModel folder (config.json + model.safetensors or
    pytorch_model.bin). Raises `CheckpointError` for any other folder, saying what to pass instead."""
    folder = Path(folder)
    if (folder / "checkpoint").is_dir():
        raise CheckpointError(
            f"{folder} is a DeepSpeed checkpoint (a directory of per-rank shards); gather it into one file "
            'first: python -c "from pytorch_lightning.utilities.deepspeed import '
            f"convert_zero_checkpoint_to_fp32_state_dict as c; c('{folder}', 'model.ckpt')\" "
            "and pass model.ckpt"
        )
    weights = next((folder / n for n in _WEIGHTS_FILES if (folder / n).is_file()), None)
    has_config = (folder / CONFIG_FILE).is_file()
    if has_config and weights is not None:
        return weights
    if has_config or weights is not None:
        present, absent = (
            (CONFIG_FILE, " or ".join(_WEIGHTS_FILES)) if has_config else (weights.name, CONFIG_FILE)
        )
        raise CheckpointError(
            f"{folder} holds {present} but no {absent}: a Hugging Face CLIPModel folder needs both "
            "(sharded weights are not read)"
        )
    # Most likely a run folder or its checkpoints/ folder: name the files that could be meant.
    candidates = sorted(
        p
        for where in (folder, folder / "checkpoints")
        if where.is_dir()
        for p in where.iterdir()
        if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES
    )
    candidates.sort(key=lambda p: p.name != "last.ckpt")  # the one to pass, most often
    what = "a checkpoint file"
    if candidates:
        more = len(candidates) - _SUGGESTED_FILES
        shown = ", ".join(str(p) for p in candidates[:_SUGGESTED_FILES]) + (
            f", … ({more} more)" if more > 0 else ""
        )
        what = f"one of its checkpoint files ({shown})"
    raise CheckpointError(
        f"{folder} is a folder, not a checkpoint: pass {what}, or a Hugging Face CLIPModel folder "
        f"({CONFIG_FILE} + {WEIGHTS_FILE})"
    )


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header (the tensors are not read); [] when the file is no
    readable safetensors file, whose reader then says why."""
    if checkpoint_file_problem(path) is not None:
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError):
        return []


def _huggingface_config_file(weights: Path) -> Path:
    config = weights.parent / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(
            f"{weights} holds a Hugging Face CLIPModel's weights, whose architecture is in the "
            f"{CONFIG_FILE} written beside them, and there is none: pass the folder with both files"
        )
    return config


def _load_huggingface(weights: Path) -> CLIP:
    """A CLIPModel's weights file and the config.json beside it, read into our model."""
    config_file = _huggingface_config_file(weights)
    try:
        record = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not JSON: {exc}") from exc
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{config_file} holds a JSON {type(record).__name__}, not an object")
    state, _ = read_openai_state_dict(weights)  # any state dict: safetensors or torch, wrappers removed
    try:
        return model_from_huggingface(record, state)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{weights} (Hugging Face CLIPModel weights, with {config_file}): {exc}"
        ) from exc


def _torch_load(path: Path) -> object:
    try:
        return safe_torch_load(path)
    except CheckpointError as exc:  # names the file, so load_model would not add what it may be
        raise CheckpointError(f"{exc}. Expected {EXPECTED_KINDS}") from exc


def _is_lightning(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state_dict"), Mapping)
        and any(isinstance(k, str) and k.startswith(_MODEL_PREFIX) for k in obj["state_dict"])
    )


_SCALAR_PARAMETERS = ("logit_scale", "logit_bias")


def _model_state(state: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """The model's tensors under our own names: Lightning's "model." prefix and wrapper prefixes removed
    (entries of the loss and other sub-modules dropped)."""
    prefixed = any(isinstance(k, str) and k.startswith(_MODEL_PREFIX) for k in state)
    out = {}
    for key, value in state.items():
        if prefixed:
            if not key.startswith(_MODEL_PREFIX):
                continue
            key = key[len(_MODEL_PREFIX) :]
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key in _SCALAR_PARAMETERS and value.shape == (1,):
            # Written under DeepSpeed or FSDP, which hold these with shape (1,) (promote_scalar_parameters).
            value = value.reshape(())
        out[key] = value
    return out


def _load_own(obj: Mapping[str, Any], path: Path) -> CLIP:
    config = clip_config_from_dict(obj[CONFIG_KEY])
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} has a {CONFIG_KEY!r} record but no 'state_dict' of tensors")
    model = CLIP(config)
    try:
        result = model.load_state_dict(_model_state(state, path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"{path}: the weights do not fit the recorded {CONFIG_KEY}: {str(exc).strip()[:2000]}"
        ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: the weights do not fit the recorded {CONFIG_KEY}: missing {missing[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    return model.float().eval()


def _load_lightning_without_config(obj: Mapping[str, Any], path: Path) -> CLIP:
    state = _model_state(obj["state_dict"], path)
    openai_names = {k.removeprefix("text."): v for k, v in state.items()}
    config = dataclasses.replace(config_from_openai_state_dict(openai_names), quick_gelu=False)
    warnings.warn(
        f"{path} has no {CONFIG_KEY!r} record (written by an older trainer): the architecture was inferred "
        "from the tensors and the activation assumed to be exact GELU",
        stacklevel=3,
    )
    model = CLIP(config)
    load_openai_state_dict(model, openai_names)
    return model.float().eval()
