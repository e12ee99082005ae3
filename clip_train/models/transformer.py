"""The pre-LayerNorm residual attention block shared by CLIP's image and text towers.

Tensors are batch-first, (B, N, D). Parameter names follow OpenAI's release (`attn.in_proj_weight`,
`mlp.c_fc`, `ln_1`, ...) so that its checkpoints load without renaming; the arithmetic is our own, with
`F.scaled_dot_product_attention` doing the attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x·σ(1.702x): the GELU approximation that OpenAI's released CLIP models were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection."""

    def __init__(self, width: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, hs)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation_layer(quick_gelu)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, N, D) -> (B, N, hidden) -> (B, N, D)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, causal: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, round(width * mlp_ratio), quick_gelu)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """A stack of residual attention blocks, optionally recomputing each block's activations in the
    backward pass (gradient checkpointing) to trade compute for memory."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, causal) for _ in range(layers)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """The CLIP initialisation: projections scaled by 1/√width, the residual outputs further by
        1/√(2·layers) so that the residual stream's variance does not grow with depth."""
        width, layers = self.width, len(self.resblocks)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)  # (B, N, D)
        return x
