"""The text tower of CLIP: a causal Transformer over byte-pair tokens (Radford et al., 2021, section 2.4).

Tokens → embeddings + learned positional embeddings → causal residual attention blocks → LayerNorm → the
activation at the end-of-text token (which, with causal attention, has seen the whole text) → projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clip_train.models.configs import TextTransformerConfig
from clip_train.models.transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, config: TextTransformerConfig, embed_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(
            width, config.layers, config.heads, config.mlp_ratio, quick_gelu, causal=True
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.width**-0.5)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids, L <= context_length, each row holding `eot_token_id` → (B, embed_dim)
        unnormalised features. Shorter rows give the same features as zero-padded ones: attention is
        causal, so nothing after the end-of-text token reaches it."""
        B, L = tokens.shape
        x = self.token_embedding(tokens)  # (B, L, D)
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.transformer(x)  # (B, L, D)
        x = self.ln_final(x)
        # The first end-of-text position of each row. With CLIP's vocabulary this is where the original's
        # argmax over the ids points, since end-of-text is the largest id.
        eot = (tokens == self.config.eot_token_id).int().argmax(dim=1)  # (B,)
        x = x[torch.arange(B, device=x.device), eot]  # (B, D)
        return x @ self.text_projection  # (B, embed_dim)
