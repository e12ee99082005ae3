"""Dataclass configurations of the CLIP towers and the named models of the CLIP paper.

`get_model_config("ViT-B/32")` returns a fresh `CLIPConfig`; names are matched case-insensitively with
punctuation ignored, so "ViT-B/32", "vit_b32" and OpenCLIP's "ViT-B-32" all name the same model, and
"ViT-L/14@336px" can be written "vit_l14_336". The paper's models follow Radford et al. (2021), table 19/20
and the released checkpoints; "vit-tiny" and "rn-tiny" are small enough to train on a CPU in minutes.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_VOCAB_SIZE = 49_408
DEFAULT_EOT_TOKEN_ID = 49_407  # <|endoftext|>: the last id of CLIP's vocabulary
DEFAULT_CONTEXT_LENGTH = 77


@dataclass
class VisionTransformerConfig:
    """The ViT image tower: `image_size` and `patch_size` in pixels, `width` the token dimension."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    # FLIP (Li et al., 2023): fraction of patch tokens dropped at random in training; 0 disables it.
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        _require_positive(self, "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.head_width:
            raise ValueError(f"vision width {self.width} is not a multiple of head_width {self.head_width}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must lie in [0, 1), got {self.patch_dropout}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ModifiedResNetConfig:
    """The paper's modified ResNet image tower: `layers` bottleneck blocks in each of the four stages,
    `width` the stem's output channels (the final feature map has 32 × width channels)."""

    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    head_width: int = 64  # of the attention pooling

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)  # Hydra hands over lists
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"ResNet layers must be four positive block counts, got {list(self.layers)}")
        _require_positive(self, "image_size", "width", "head_width")
        if self.image_size % 32:
            raise ValueError(
                f"ResNet image_size must be a multiple of 32 (the total stride), got {self.image_size}"
            )
        if self.width % 2:
            raise ValueError(
                f"ResNet width must be even (the stem's first convolutions use width // 2), got {self.width}"
            )
        if (self.width * 32) % self.head_width:
            raise ValueError(
                f"32 × width = {self.width * 32} is not a multiple of head_width {self.head_width}"
            )

    @property
    def heads(self) -> int:
        return self.width * 32 // self.head_width


@dataclass
class TextTransformerConfig:
    """The causal text Transformer; features are taken at the first `eot_token_id` of each sequence."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    vocab_size: int = DEFAULT_VOCAB_SIZE
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    eot_token_id: int = DEFAULT_EOT_TOKEN_ID

    def __post_init__(self) -> None:
        _require_positive(self, "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not a multiple of heads {self.heads}")
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise ValueError(
                f"eot_token_id {self.eot_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )


VisionConfig = VisionTransformerConfig | ModifiedResNetConfig


@dataclass
class CLIPConfig:
    """Two towers projecting into a shared `embed_dim`-dimensional space, plus the learned temperature.

    `init_logit_scale` and `max_logit_scale` are in log space (the CLIP paper: 1/0.07 at the start, never
    above 100). `init_logit_bias` adds a learned bias (SigLIP: scale 10, bias -10); None leaves it out.
    `quick_gelu` selects x·σ(1.702x), the activation of OpenAI's released models, over the exact GELU.
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionTransformerConfig)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision, Mapping):  # from YAML: a ResNet is recognised by its list of stage depths
            vision = dict(self.vision)
            layers = vision.get("layers")
            is_resnet = isinstance(layers, Sequence) and not isinstance(layers, str)
            self.vision = (ModifiedResNetConfig if is_resnet else VisionTransformerConfig)(**vision)
        if isinstance(self.text, Mapping):
            self.text = TextTransformerConfig(**self.text)
        if not isinstance(self.vision, VisionTransformerConfig | ModifiedResNetConfig):
            raise TypeError(
                f"vision must be a VisionTransformerConfig or ModifiedResNetConfig, got {type(self.vision)}"
            )
        if not isinstance(self.text, TextTransformerConfig):
            raise TypeError(f"text must be a TextTransformerConfig, got {type(self.text)}")
        _require_positive(self, "embed_dim")
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(
                f"init_logit_scale {self.init_logit_scale} exceeds max_logit_scale {self.max_logit_scale}"
            )


def _require_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {value}")


# ------------------------------------------------------------------------------------------ named models


def _vit(
    embed_dim: int,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    text_width: int,
    text_heads: int,
) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionTransformerConfig(
            image_size=image_size, patch_size=patch_size, width=width, layers=layers
        ),
        text=TextTransformerConfig(width=text_width, heads=text_heads, layers=12),
    )


def _resnet(
    embed_dim: int,
    image_size: int,
    layers: tuple[int, int, int, int],
    width: int,
    text_width: int,
    text_heads: int,
) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=ModifiedResNetConfig(image_size=image_size, layers=layers, width=width),
        text=TextTransformerConfig(width=text_width, heads=text_heads, layers=12),
    )


# Heads are width // 64 throughout, as in the released checkpoints (the loader infers them that way).
_REGISTRY: dict[str, Callable[[], CLIPConfig]] = {
    "RN50": lambda: _resnet(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": lambda: _resnet(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": lambda: _resnet(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": lambda: _resnet(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": lambda: _resnet(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B/32": lambda: _vit(512, 224, 32, 768, 12, 512, 8),
    "ViT-B/16": lambda: _vit(512, 224, 16, 768, 12, 512, 8),
    "ViT-L/14": lambda: _vit(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L/14@336px": lambda: _vit(768, 336, 14, 1024, 24, 768, 12),
    # CPU-sized models: a few minutes of training show the loss falling. The 49,408-token embedding
    # (3.2 M parameters) dominates their size; the towers themselves are ~0.3-0.8 M parameters.
    "vit-tiny": lambda: CLIPConfig(
        embed_dim=64,
        vision=VisionTransformerConfig(image_size=32, patch_size=8, width=128, layers=2),
        text=TextTransformerConfig(width=64, heads=1, layers=2),
    ),
    "rn-tiny": lambda: CLIPConfig(
        embed_dim=64,
        vision=ModifiedResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=16),
        text=TextTransformerConfig(width=64, heads=1, layers=2),
    ),
}


def _canonical(name: str) -> str:
    """ "ViT-L/14@336px", "vit_l14_336" and "ViT-L-14-336" all map to "vitl14336"."""
    return re.sub(r"[^a-z0-9]", "", name.lower().removesuffix("px"))


_BY_CANONICAL = {_canonical(name): name for name in _REGISTRY}


def list_model_configs() -> list[str]:
    """The registered model names, in their canonical spelling."""
    return list(_REGISTRY)


def get_model_config(name: str) -> CLIPConfig:
    """A fresh `CLIPConfig` for a named model (see the module docstring for accepted spellings)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    canonical = _BY_CANONICAL.get(_canonical(name))
    if canonical is None:
        raise ValueError(f"unknown model config {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[canonical]()


def apply_overrides(config: CLIPConfig, overrides: Mapping[str, Any]) -> CLIPConfig:
    """A copy of `config` with top-level fields replaced; `vision` and `text` may be given as a mapping of
    the fields to change (e.g. `vision={"patch_dropout": 0.5}`) or as a whole tower config."""
    known = {f.name for f in fields(CLIPConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown CLIPConfig field(s) {unknown}; valid fields: {sorted(known)}")
    changes = dict(overrides)
    for tower in ("vision", "text"):
        value = changes.get(tower)
        if isinstance(value, Mapping):
            current = getattr(config, tower)
            valid = {f.name for f in fields(current)}
            bad = sorted(set(value) - valid)
            if bad:
                raise ValueError(
                    f"unknown {type(current).__name__} field(s) {bad}; valid fields: {sorted(valid)}"
                )
            changes[tower] = replace(current, **value)
    return replace(copy.deepcopy(config), **changes)
