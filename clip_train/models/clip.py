"""The two-tower CLIP model and its learned temperature (Radford et al., 2021).

An image tower (`VisionTransformer` or `ModifiedResNet`) and a text tower (`TextTransformer`) each map their
input into a shared `embed_dim`-dimensional space; `forward` returns both L2-normalised, with the
temperature exp(logit_scale) (clamped at `max_logit_scale`) and the optional SigLIP bias, ready for a loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_train.models.configs import (
    CLIPConfig,
    ModifiedResNetConfig,
    VisionTransformerConfig,
    apply_overrides,
    get_model_config,
)
from clip_train.models.length_groups import encode_in_length_groups
from clip_train.models.modified_resnet import ModifiedResNet
from clip_train.models.text_transformer import TextTransformer
from clip_train.models.vision_transformer import VisionTransformer

# Parameters exempt from weight decay beyond the gains and biases (CLIP paper, section 2.5).
_EMBEDDING_SUFFIXES = ("positional_embedding", "class_embedding", "token_embedding.weight")


class CLIPOutput(NamedTuple):
    # A named tuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output for its
    # backward bookkeeping and looks inside tuples only; behind a dataclass the temperature's gradient was
    # silently dropped (zero at every step, DeepSpeed 0.19.8).
    image_embeds: Tensor  # (B, D), unit L2 norm
    text_embeds: Tensor  # (B, D), unit L2 norm
    logit_scale: Tensor  # scalar, exp of the log-space parameter, at most exp(max_logit_scale)
    logit_bias: Tensor | None  # scalar, or None when the model has no bias


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        if isinstance(config.vision, VisionTransformerConfig):
            self.visual: nn.Module = VisionTransformer(config.vision, config.embed_dim, config.quick_gelu)
        elif isinstance(config.vision, ModifiedResNetConfig):
            self.visual = ModifiedResNet(config.vision, config.embed_dim)
        else:
            raise TypeError(f"unsupported vision config {type(config.vision).__name__}")
        self.text = TextTransformer(config.text, config.embed_dim, config.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias: nn.Parameter | None = None
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        # Whether encode_text checks token values (range, end-of-text), which costs a device
        # synchronisation per call; training turns it off, its data module checks each batch instead.
        self.check_token_values = True

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float images, normalised, at `image_size` → (B, embed_dim) unnormalised features."""
        self._check_images(images)
        return self.visual(images)

    def encode_text(
        self, tokens: Tensor, text_lengths: Sequence[int] | None = None, text_groups: int = 4
    ) -> Tensor:
        """(B, L) int64 token ids, L <= `context_length`, each row with an end-of-text token →
        (B, embed_dim) unnormalised features.

        text_lengths: each row's length up to and including its end-of-text token; given, the rows are
            encoded in `text_groups` groups of similar length, each padded only as far as it needs
            (exact, see `clip_train.models.length_groups`)."""
        self._check_tokens(tokens)
        if text_lengths is None:
            return self.text(tokens)
        return encode_in_length_groups(self.text, tokens, text_lengths, text_groups)

    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        text_lengths: Sequence[int] | None = None,
        text_groups: int = 4,
    ) -> CLIPOutput:
        image_embeds = F.normalize(self.encode_image(images), dim=-1)  # (B, D)
        text_embeds = F.normalize(self.encode_text(tokens, text_lengths, text_groups), dim=-1)  # (B, D)
        logit_scale, logit_bias = self.logit_scale_and_bias()
        return CLIPOutput(image_embeds, text_embeds, logit_scale, logit_bias)

    def logit_scale_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The temperature as the loss uses it (exp of the parameter, at most exp(max_logit_scale)) and the
        bias (None without one), both 0-dim and attached to their parameters' graph.

        The parameters themselves are 0-dim, as in OpenAI's release, except under DeepSpeed and FSDP, which
        refuse 0-dim parameters: there the training module gives them shape (1,) (see
        `clip_train.training.sharding.promote_scalar_parameters`); the reshape keeps the loss's
        view of them the same either way."""
        scale = self.logit_scale.clamp(max=self.config.max_logit_scale).exp().reshape(())
        bias = None if self.logit_bias is None else self.logit_bias.reshape(())
        return scale, bias

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log-space temperature parameter in place; call after every optimiser step."""
        self.logit_scale.clamp_(max=self.config.max_logit_scale)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only) to save memory."""
        self.visual.set_grad_checkpointing(enabled)
        self.text.set_grad_checkpointing(enabled)

    def no_weight_decay_param_names(self) -> set[str]:
        """Names of the parameters that weight decay must not touch: gains, biases, embeddings and the
        temperature (and bias)."""
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim < 2 or name.endswith(_EMBEDDING_SUFFIXES)
        }

    # ------------------------------------------------------------------------------------ input checks
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        size = self.image_size
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(
                f"images must have 3 channels (RGB), got {images.shape[1]} in {tuple(images.shape)}"
            )
        if tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"this model takes {size}×{size} images, got {images.shape[2]}×{images.shape[3]}; resize "
                "them with the model's transforms"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}")

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a tensor, got {type(tokens).__name__}")
        cfg = self.config.text
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids (torch.long), got {tokens.dtype}")
        if not 0 < tokens.shape[1] <= cfg.context_length:
            raise ValueError(
                f"token sequences must have length 1..{cfg.context_length} (the context length), got "
                f"{tokens.shape[1]}"
            )
        if self.check_token_values and tokens.numel() > 0 and not torch.compiler.is_compiling():
            check_token_values(tokens, cfg.vocab_size, cfg.eot_token_id)


def check_token_values(
    tokens: Tensor, vocab_size: int, eot_token_id: int, keys: Sequence[str] | None = None
) -> None:
    """Refuse token ids outside the vocabulary and rows without an end-of-text token (where the text
    features are read), naming the rows, or their sample keys when given. One device synchronisation."""
    low, high, has_eot = torch.stack(
        [tokens.min(), tokens.max(), (tokens == eot_token_id).any(dim=1).all()]
    ).tolist()

    def named(rows: list[int]) -> str:
        return f"samples {[keys[r] for r in rows[:10]]}" if keys is not None else f"rows {rows[:10]}"

    if low < 0 or high >= vocab_size:
        bad = ((tokens < 0) | (tokens >= vocab_size)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (the vocabulary), got values in [{low}, {high}] "
            f"({named(bad)}); tokenize with the model's tokenizer"
        )
    if not has_eot:
        rows = (~(tokens == eot_token_id).any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"{named(rows)} have no end-of-text token (id {eot_token_id}), where the text features are "
            "read; tokenize with the model's tokenizer"
        )


def build_model(name_or_config: str | CLIPConfig, **overrides: Any) -> CLIP:
    """Build a freshly initialised CLIP from a registered name (see `list_model_configs`) or a config,
    with top-level config fields replaced by `overrides` (`vision`/`text` may be partial mappings).

    Build on the meta device to inspect a model without allocating it:
    `with torch.device("meta"): build_model("ViT-L/14")`.
    """
    if isinstance(name_or_config, str):
        config = get_model_config(name_or_config)
    elif isinstance(name_or_config, CLIPConfig):
        config = name_or_config
    elif isinstance(name_or_config, Mapping):
        config = CLIPConfig(**name_or_config)
    else:
        raise TypeError(f"expected a model name or a CLIPConfig, got {type(name_or_config).__name__}")
    if overrides:
        config = apply_overrides(config, overrides)
    return CLIP(config)
