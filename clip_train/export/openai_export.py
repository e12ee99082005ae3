"""Export to the state-dict layout of OpenAI's CLIP release, which OpenCLIP reads too.

Writes `open_clip_model.safetensors` (the weights under OpenAI's names, via
`clip_train.models.openai_layout`, with the activation recorded in the metadata) and `open_clip_config.json`
(OpenCLIP's record of the architecture and the image normalisation), the two files OpenCLIP keeps together.
`clip_train.checkpoints.load_model` reads the .safetensors file back on its own.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from clip_train.data.transforms import CLIP_MEAN, CLIP_STD
from clip_train.export.files import ExportedFile, ExportError
from clip_train.models import CLIP, ModifiedResNetConfig
from clip_train.models.openai_layout import CheckpointError, save_openai_checkpoint, to_openai_state_dict

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def check_openai_expressible(model: CLIP) -> None:
    """Raise `ExportError` for a model whose architecture the layout's loader would read back wrongly."""
    try:
        to_openai_state_dict(model)
    except CheckpointError as exc:
        raise ExportError(f"cannot export to the OpenAI/OpenCLIP layout: {exc}") from exc


def open_clip_config(model: CLIP) -> dict[str, Any]:
    """OpenCLIP's `open_clip_config.json` record: {"model_cfg": {...}, "preprocess_cfg": {...}}."""
    config = model.config
    vision = config.vision
    if isinstance(vision, ModifiedResNetConfig):
        vision_cfg: dict[str, Any] = {
            "image_size": vision.image_size,
            "layers": list(vision.layers),
            "width": vision.width,
            "head_width": vision.head_width,
            "patch_size": None,
        }
    else:
        vision_cfg = {
            "image_size": vision.image_size,
            "layers": vision.layers,
            "width": vision.width,
            "head_width": vision.head_width,
            "mlp_ratio": vision.mlp_ratio,
            "patch_size": vision.patch_size,
        }
    text = config.text
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias)
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def export_openai(model: CLIP, out_dir: str | Path, *, fp16: bool = False) -> list[ExportedFile]:
    """Write the model in the OpenAI/OpenCLIP layout to `out_dir` (which must exist); float16 weights with
    `fp16`. Raises `ExportError` for a model the layout cannot express (its loader infers heads as
    width // 64 and pools text at the largest token id)."""
    check_openai_expressible(model)
    out = Path(out_dir)
    if fp16:
        model = copy.deepcopy(model).to(torch.float16)
    weights = save_openai_checkpoint(model, out / WEIGHTS_FILE)
    config = out / CONFIG_FILE
    config.write_text(json.dumps(open_clip_config(model), indent=2) + "\n")
    precision = "fp16" if fp16 else "fp32"
    return [
        ExportedFile(weights, f"weights, OpenAI layout, {precision}"),
        ExportedFile(config, "OpenCLIP model config"),
    ]
