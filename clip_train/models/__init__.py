"""CLIP models: the ViT and modified-ResNet image towers, the causal text tower, and the two-tower model.

    from clip_train.models import build_model
    model = build_model("ViT-B/32")            # or "vit-tiny" for a CPU-sized model
    out = model(images, tokens)                # CLIPOutput: normalised embeddings, temperature, bias

OpenAI / OpenCLIP checkpoints: `clip_train.models.openai_layout.load_openai_checkpoint(path)`.
"""

from clip_train.models.clip import CLIP, CLIPOutput, build_model
from clip_train.models.configs import (
    CLIPConfig,
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
    get_model_config,
    list_model_configs,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "ModifiedResNetConfig",
    "TextTransformerConfig",
    "VisionTransformerConfig",
    "build_model",
    "get_model_config",
    "list_model_configs",
]
