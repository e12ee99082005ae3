"""Read and write checkpoints in the state-dict layout of OpenAI's CLIP release (also OpenCLIP's).

The layout keeps the image tower under `visual.` and the text tower at the top level
(`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.*`, `ln_final.*`,
`text_projection`), plus `logit_scale` (and OpenCLIP's `logit_bias` for SigLIP models). Our `CLIP` uses the
same names with the text tower under `text.`, so converting is a prefix change.

The architecture is not stored: it is inferred from the tensors, as the original code does (ViT when
`visual.proj` exists, else ResNet; widths, depths, patch size, image size, context length and vocabulary from
shapes; heads = width // 64). Two properties cannot be inferred and follow the original release unless told
otherwise: the activation (QuickGELU, recorded in our .safetensors metadata) and the text pooling position
(the largest token id, i.e. end-of-text = vocab_size - 1). `to_openai_state_dict` refuses models that this
inference would get wrong.

Loading never executes code from the file: `safe_torch_load` (`torch.load(..., weights_only=True)`)
or safetensors.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from clip_train.models.clip import CLIP
from clip_train.models.configs import (
    CLIPConfig,
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
)

HEAD_WIDTH = 64  # the original code derives every head count from this
_TEXT_PREFIX = "text."
# Non-parameter entries of OpenAI's TorchScript-derived state dicts, dropped by the original loader too.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SAFETENSORS_QUICK_GELU = "clip_train.quick_gelu"
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into a CLIP model; the message names the offending keys."""


# ---------------------------------------------------------------------------------------- conversion


def to_openai_state_dict(model: CLIP) -> dict[str, Tensor]:
    """The model's state dict under OpenAI's names (tensors shared with the model, not copied).

    Raises `CheckpointError` for a model that the layout cannot express, i.e. whose architecture
    `config_from_openai_state_dict` would not recover (e.g. heads != width // 64).
    """
    state = {}
    for name, tensor in model.state_dict().items():
        state[name.removeprefix(_TEXT_PREFIX)] = tensor
    _check_expressible(model.config, config_from_openai_state_dict(state))
    return state


def config_from_openai_state_dict(state_dict: Mapping[str, Tensor]) -> CLIPConfig:
    """Infer the architecture of an OpenAI-layout state dict from its tensors' names and shapes.

    `quick_gelu` is set to True (the original release's activation); the text features are read at the
    largest token id (`eot_token_id = vocab_size - 1`), as the original's argmax pooling does.
    """
    sd = state_dict
    _require_keys(
        sd, ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"]
    )
    text_width = sd["ln_final.weight"].shape[0]
    vocab_size = sd["token_embedding.weight"].shape[0]
    text = TextTransformerConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        width=text_width,
        heads=_heads(text_width, "text"),
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=_mlp_ratio(sd, "transformer.resblocks.0.mlp.c_fc.weight", text_width),
        eot_token_id=vocab_size - 1,
    )
    if "visual.proj" in sd:
        _require_keys(sd, ["visual.conv1.weight", "visual.positional_embedding"])
        width, _, patch_size, _ = sd["visual.conv1.weight"].shape
        grid = _square_root(sd["visual.positional_embedding"].shape[0] - 1, "visual.positional_embedding")
        vision: VisionTransformerConfig | ModifiedResNetConfig = VisionTransformerConfig(
            image_size=patch_size * grid,
            patch_size=patch_size,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            head_width=HEAD_WIDTH,
            mlp_ratio=_mlp_ratio(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", width),
        )
    else:
        _require_keys(sd, ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        grid = _square_root(
            sd["visual.attnpool.positional_embedding"].shape[0] - 1, "visual.attnpool.positional_embedding"
        )
        vision = ModifiedResNetConfig(
            image_size=32 * grid,
            layers=layers,  # type: ignore[arg-type]
            width=sd["visual.layer1.0.conv1.weight"].shape[0],
            head_width=HEAD_WIDTH,
        )
    logit_bias = sd.get("logit_bias")
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=vision,
        text=text,
        quick_gelu=True,
        init_logit_bias=None if logit_bias is None else float(logit_bias),
    )


def load_openai_state_dict(model: CLIP, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> CLIP:
    """Copy an OpenAI-layout state dict into `model` (in place; returns it).

    Strict: any missing or unexpected key, or any shape mismatch, raises `CheckpointError` listing them.
    Not strict: unexpected keys are ignored and missing ones keep their initial values (with a warning);
    shape mismatches are errors either way. BatchNorm `num_batches_tracked` counters may be absent.
    """
    expected = {name.removeprefix(_TEXT_PREFIX): name for name in model.state_dict()}
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    own = model.state_dict()
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[expected[k]].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(own[expected[k]].shape)
    ]
    problems = []
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {_listing(mis_shaped)}")
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError("the state dict does not fit the model; " + "; ".join(problems))
    if missing or unexpected:
        warnings.warn(
            f"non-strict load: {len(missing)} missing keys keep their initial values "
            f"({_listing(missing)}); {len(unexpected)} unexpected keys ignored ({_listing(unexpected)})",
            stacklevel=2,
        )
    ours = {expected[k]: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(ours, strict=False)
    return model


def _check_expressible(config: CLIPConfig, inferred: CLIPConfig) -> None:
    # Fields the layout does not carry, or carries elsewhere (quick_gelu: the caller's flag / metadata).
    ignored = {"quick_gelu", "init_logit_scale", "max_logit_scale", "patch_dropout"}
    ours, theirs = _flatten(asdict(config)), _flatten(asdict(inferred))
    if config.init_logit_bias is not None:  # the bias is stored; only its presence shapes the model
        ignored.add("init_logit_bias")
    differences = [
        f"{key}={ours[key]!r} would be read back as {theirs.get(key)!r}"
        for key in ours
        if key.rsplit(".", 1)[-1] not in ignored and ours[key] != theirs.get(key)
    ]
    if differences:
        raise CheckpointError(
            "this model cannot be expressed in the OpenAI layout, whose loader infers heads = width // 64 "
            "and pools text at the largest token id: " + "; ".join(differences)
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _require_keys(sd: Mapping[str, Tensor], keys: list[str]) -> None:
    absent = [k for k in keys if k not in sd]
    if absent:
        sample = _listing(sorted(sd))
        raise CheckpointError(
            f"not an OpenAI/OpenCLIP CLIP state dict: missing {absent} (found {len(sd)} keys: {sample})"
        )


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if not indices:
        raise CheckpointError(f"no blocks found under {prefix!r}")
    if indices != set(range(len(indices))):
        raise CheckpointError(
            f"blocks under {prefix!r} are not numbered 0..{len(indices) - 1}: {sorted(indices)}"
        )
    return len(indices)


def _heads(width: int, tower: str) -> int:
    if width % HEAD_WIDTH:
        raise CheckpointError(
            f"{tower} width {width} is not a multiple of {HEAD_WIDTH}: heads cannot be inferred"
        )
    return width // HEAD_WIDTH


def _mlp_ratio(sd: Mapping[str, Tensor], key: str, width: int) -> float:
    _require_keys(sd, [key])
    return sd[key].shape[0] / width


def _square_root(n: int, key: str) -> int:
    root = round(n**0.5)
    if root * root != n:
        raise CheckpointError(f"{key} has {n} + 1 rows, but a square grid needs a square number of positions")
    return root


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", … ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------- files


# First bytes of files that are given by mistake where a checkpoint is expected, to name what was given.
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (a WebP image?)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)
_HEAD_BYTES = 64
_WEIGHTS_UNPICKLER = "WeightsUnpickler error:"


def checkpoint_file_problem(path: str | Path) -> str | None:
    """Why the existing file `path` cannot be a PyTorch checkpoint or a safetensors file, judged by its first
    bytes ("it is a JPEG image", "it is a text file", ...), or None when it starts like one of them.

    torch.save writes a zip archive (or, in its legacy format, a pickle of protocol 2 or later) and a
    safetensors file opens with the 8-byte length of its JSON header; anything else is refused here, because
    torch.load's own failure on it is a page of advice ending in "load it with weights_only=False", which
    would be unsafe and would not help (the file is no checkpoint at all)."""
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(_HEAD_BYTES)
    if not head:
        return "it is empty"
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None  # a zip archive, or a pickle's PROTO opcode
    header_length = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and 8 + header_length <= path.stat().st_size:
        return None
    for magic, kind in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"it is {kind}"
    # Up to 3 bytes of a multi-byte character may be cut off at the end of the head.
    text = head.decode("utf-8", errors="ignore")
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c.isspace() for c in text):
        return "it is a text file"
    return "its first bytes are those of neither a zip archive, a pickle nor a safetensors header"


def check_checkpoint_file(path: str | Path) -> Path:
    """`path` when it may be a checkpoint file: FileNotFoundError when it does not exist, CheckpointError
    ("photo.jpg is not a PyTorch checkpoint or safetensors file: it is a JPEG image") when its first bytes
    rule that out (`checkpoint_file_problem`). A folder is passed on unchecked: `load_model` explains the
    folders it meets (a DeepSpeed checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        problem = checkpoint_file_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint or safetensors file: {problem}")
    return path


def torch_load_failure(exc: BaseException) -> str:
    """One line saying why `torch.load(..., weights_only=True)` failed. Torch's message on a refused object
    spans several lines, with terminal escape codes and advice to load the file unsafely; the reason is on
    the line after "WeightsUnpickler error:", which is all that is kept."""
    message = str(exc)
    if _WEIGHTS_UNPICKLER in message:
        after = message.split(_WEIGHTS_UNPICKLER, 1)[1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return (
            f"it holds other pickled objects, whose loading could run code (refused: "
            f"{reason.split('. ')[0].rstrip('.')})"
        )
    first_line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def safe_torch_load(path: str | Path, what: str = "PyTorch checkpoint") -> object:
    """What `torch.save` wrote to `path`, read onto the CPU with `weights_only=True` so that no code in the
    file runs: the one place this project loads a torch file. Every failure is one line naming the file and
    `what` it should have been, with the reason instead of torch's page of advice to load it unsafely:
    FileNotFoundError for a missing path, `CheckpointError` for a folder, a file whose first bytes rule
    torch out (`checkpoint_file_problem`), a TorchScript archive, or one torch refuses or cannot read.
    Callers with advice of their own ("write one with ...") add it to these messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a {what}")
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a {what}: {problem}")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        # torch.load refuses it too, but with advice to load it unsafely rather than how to get its weights.
        raise CheckpointError(
            f"{path} is a TorchScript archive (the format of OpenAI's original CLIP downloads), not a "
            f"{what}; loading it would execute its code. If it holds weights you trust, save its "
            "state_dict with `torch.jit.load(path).state_dict()` in a trusted environment, or use "
            "OpenCLIP's .safetensors copy of the weights"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused (arbitrary objects), or a damaged file
        raise CheckpointError(f"cannot read {path} as a {what}: {torch_load_failure(exc)}") from exc


def read_openai_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict of a .pt/.bin/.safetensors file, unwrapped from a `"state_dict"` entry and from
    `module.` prefixes, with the file's safetensors metadata (empty for torch files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        problem = checkpoint_file_problem(path)
        if problem is not None:  # safetensors' own message ("HeaderTooLarge") does not say what the file is
            raise CheckpointError(f"cannot read {path} as safetensors: {problem}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            obj: object = load_file(str(path))
        except SafetensorError as exc:  # not safetensors at all, or truncated / corrupt
            raise CheckpointError(
                f"cannot read {path} as safetensors (corrupt or truncated?): {exc}"
            ) from exc
    else:
        obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key in _METADATA_KEYS:
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state, metadata


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_openai_checkpoint(path: str | Path, *, strict: bool = True, quick_gelu: bool | None = None) -> CLIP:
    """Build a CLIP model from an OpenAI/OpenCLIP-layout checkpoint file (.pt, .bin or .safetensors),
    inferring the architecture from the tensors. The model is float32 and in eval mode.

    `quick_gelu`: the activation; None takes it from our .safetensors metadata, else True (OpenAI's
    release). OpenCLIP models trained without "-quickgelu" in their name need `quick_gelu=False`.
    """
    state, metadata = read_openai_state_dict(path)
    config = config_from_openai_state_dict(state)
    if quick_gelu is None:
        quick_gelu = metadata.get(_SAFETENSORS_QUICK_GELU, "true") == "true"
    model = CLIP(replace(config, quick_gelu=quick_gelu))
    load_openai_state_dict(model, state, strict=strict)
    return model.eval()


def save_openai_checkpoint(model: CLIP, path: str | Path) -> Path:
    """Write the model in the OpenAI layout: safetensors when `path` ends in .safetensors (with the
    activation recorded in its metadata), else `torch.save` of a plain dict of tensors. Returns the path."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in to_openai_state_dict(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        quick = "true" if model.config.quick_gelu else "false"
        save_safetensors(state, path, metadata={"format": "pt", _SAFETENSORS_QUICK_GELU: quick})
    else:
        torch.save(state, path)
    return path


def save_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write `tensors` to a .safetensors file with the permissions of any other new file (0644 under the
    usual umask 022). Returns the path.

    safetensors writes a temporary file, created 0600, and renames it into place, so the file would be
    readable by its owner alone, unlike the JSON and ONNX files written beside it."""
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path
