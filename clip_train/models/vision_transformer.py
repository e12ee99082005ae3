"""The Vision Transformer image tower of CLIP (Radford et al., 2021, section 2.4).

Image → non-overlapping patches (a strided convolution) → prepend a learned class token → add learned
positional embeddings → (optionally drop a random subset of patch tokens, FLIP) → LayerNorm → residual
attention blocks → LayerNorm of the class token → linear projection into the joint embedding space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clip_train.models.configs import VisionTransformerConfig
from clip_train.models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionTransformerConfig, embed_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        std = self.config.width**-0.5
        nn.init.normal_(self.class_embedding, std=std)
        nn.init.normal_(self.positional_embedding, std=std)
        nn.init.normal_(self.proj, std=std)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images at `config.image_size` → (B, embed_dim) unnormalised features."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D) with N = gh·gw
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        x = x + self.positional_embedding.to(x.dtype)
        if self.training and self.config.patch_dropout > 0:
            x = self.drop_patches(x)  # (B, 1+K, D)
        x = self.ln_pre(x)
        x = self.transformer(x)  # (B, 1+N, D)
        x = self.ln_post(x[:, 0])  # (B, D): the class token
        return x @ self.proj  # (B, embed_dim)

    def drop_patches(self, x: Tensor) -> Tensor:
        """Keep a random subset of the patch tokens of each image (a different subset per image); the class
        token, at position 0, is always kept. The positional embeddings are already added, so the kept
        tokens still know where they came from."""
        B, n_tokens, D = x.shape
        n_patches = n_tokens - 1
        n_keep = max(1, int(n_patches * (1.0 - self.config.patch_dropout)))
        keep = torch.rand(B, n_patches, device=x.device).topk(n_keep, dim=1).indices + 1  # (B, K)
        patches = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        return torch.cat([x[:, :1], patches], dim=1)  # (B, 1+K, D)
