"""The student's architecture, derived from the teacher's: by default half the width and half the depth of
the teacher's image tower with the same number of attention heads (PicCollage's recipe for ViT-B/32: width
768 → 384, 12 → 6 layers, 12 heads of 32), and the teacher's text tower, weights included.

    student = build_student("runs/vit_b32/checkpoints/last.ckpt")        # or an OpenAI ViT-B-32.pt
    student = build_student(teacher, width_ratio=0.5, depth_ratio=0.5, heads="double")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from clip_train.checkpoints import load_model
from clip_train.models import CLIP, CLIPConfig, ModifiedResNetConfig, VisionTransformerConfig
from clip_train.models.configs import apply_overrides

HeadsRule = Literal["same", "double"]


def load_teacher(teacher: str | Path | CLIP) -> CLIP:
    """A frozen float32 teacher in eval mode from any file `load_model` reads (a model: frozen in place)."""
    model = teacher if isinstance(teacher, CLIP) else load_model(teacher)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _scaled(value: int, ratio: float, multiple: int = 1) -> int:
    """value · ratio rounded to the nearest positive multiple of `multiple`."""
    return max(multiple, round(value * ratio / multiple) * multiple)


def student_config(
    teacher: CLIPConfig,
    *,
    width_ratio: float = 0.5,
    depth_ratio: float = 0.5,
    heads: HeadsRule = "same",
    embed_dim: int | None = None,
) -> CLIPConfig:
    """The teacher's config with its image tower's width and depth scaled (text tower unchanged).

    `heads`: "same" keeps the teacher's number of attention heads (each head narrower), "double" doubles
    it. The width is rounded to a multiple of the heads; depth to at least one layer (a ResNet: at least
    one block per stage). `embed_dim`: the student's joint space (None: the teacher's).
    """
    if not 0 < width_ratio <= 1 or not 0 < depth_ratio <= 1:
        raise ValueError(f"width_ratio and depth_ratio must lie in (0, 1], got {width_ratio}, {depth_ratio}")
    if heads not in ("same", "double"):
        raise ValueError(f"heads must be 'same' or 'double', got {heads!r}")
    vision = teacher.vision
    n_heads = vision.heads * (2 if heads == "double" else 1)
    if isinstance(vision, VisionTransformerConfig):
        width = _scaled(vision.width, width_ratio, n_heads)
        new_vision: Any = dataclasses.replace(
            vision, width=width, layers=_scaled(vision.layers, depth_ratio), head_width=width // n_heads
        )
    elif isinstance(vision, ModifiedResNetConfig):
        # The attention pool works on 32 × width channels; heads must divide them.
        width = _scaled(vision.width, width_ratio, 2)
        while (32 * width) % n_heads:
            width += 2
        layers = tuple(_scaled(n, depth_ratio) for n in vision.layers)
        new_vision = dataclasses.replace(vision, width=width, layers=layers, head_width=32 * width // n_heads)
    else:
        raise TypeError(f"unsupported image tower config {type(vision).__name__}")
    return dataclasses.replace(teacher, vision=new_vision, embed_dim=embed_dim or teacher.embed_dim)


def build_student(
    teacher: str | Path | CLIP,
    *,
    width_ratio: float = 0.5,
    depth_ratio: float = 0.5,
    heads: HeadsRule = "same",
    embed_dim: int | None = None,
    vision: Mapping[str, Any] | None = None,
    copy_text_tower: bool = True,
) -> CLIP:
    """A freshly initialised student for `teacher` (a checkpoint path or a model), see `student_config`.

    `vision`: explicit image-tower fields that replace the derived ones (e.g. {"width": 256, "layers": 4}).
    `copy_text_tower`: start from the teacher's text tower and temperature (needed to distil the image tower
    alone, where the student keeps the teacher's text tower frozen); only possible with the teacher's
    embed_dim.
    """
    teacher_model = load_teacher(teacher)
    config = student_config(
        teacher_model.config,
        width_ratio=width_ratio,
        depth_ratio=depth_ratio,
        heads=heads,
        embed_dim=embed_dim,
    )
    if vision:
        config = apply_overrides(config, {"vision": dict(vision)})
    student = CLIP(config)
    if copy_text_tower and config.embed_dim == teacher_model.config.embed_dim:
        with torch.no_grad():
            student.text.load_state_dict(teacher_model.text.state_dict())
            student.logit_scale.copy_(teacher_model.logit_scale)
            if student.logit_bias is not None and teacher_model.logit_bias is not None:
                student.logit_bias.copy_(teacher_model.logit_bias)
    return student


def image_tower_parameters(model: CLIP) -> int:
    return sum(p.numel() for p in model.visual.parameters())
