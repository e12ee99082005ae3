"""The Hugging Face `transformers` `CLIPModel` layout, both ways: its state-dict names and its config.json.

A CLIPModel folder holds config.json (the architecture) and model.safetensors (the weights). The
correspondence, ours → theirs, is one table (`_tensor_pairs`) read in both directions:

* `visual.*` → `vision_model.*`: conv1 → embeddings.patch_embedding, class_embedding and positional_embedding
  → embeddings.*, ln_pre → pre_layrnorm (sic), ln_post → post_layernorm; `visual.proj` (width, D) →
  `visual_projection.weight` (D, width).
* `text.*` → `text_model.*`: token_embedding / positional_embedding → embeddings.*, ln_final →
  final_layer_norm; `text.text_projection` (width, D) → `text_projection.weight` (D, width).
* Each block: the fused `attn.in_proj_*` is `self_attn.{q,k,v}_proj.*` stacked in that order; ln_1/ln_2 →
  layer_norm1/2, mlp.c_fc/c_proj → mlp.fc1/fc2.
* quick_gelu ↔ hidden_act "quick_gelu", else "gelu" (both exact GELU); LayerNorm eps 1e-5 as torch's.
* Text pooling: HF reads the first position of `eos_token_id` (for any id but 2, which selects the legacy
  argmax of the ids, i.e. the largest id), exactly our first end-of-text position, so `eos_token_id` = our
  `eot_token_id`.

CLIPModel has no ResNet image tower and no logit bias; `clip_train.export.huggingface` refuses such models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from clip_train.models.clip import CLIP
from clip_train.models.configs import CLIPConfig, TextTransformerConfig, VisionTransformerConfig
from clip_train.models.openai_layout import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which our towers use
LEGACY_EOS_ID = 2  # CLIPTextModel pools at argmax(input_ids) when eos_token_id is 2
TOWER_PREFIXES = ("vision_model.", "text_model.")
# Buffers that older transformers versions saved beside the weights; the model recomputes them.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_MAX_LISTED = 10


def _tensor_pairs(vision_layers: int, text_layers: int) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(our name, CLIPModel's names, transposed) of every tensor. One name of theirs is the same tensor
    (transposed: ours is (width, D), theirs (D, width)); three are the q, k, v thirds of our fused one."""
    yield "logit_scale", ("logit_scale",), False
    yield "visual.conv1.weight", ("vision_model.embeddings.patch_embedding.weight",), False
    yield "visual.class_embedding", ("vision_model.embeddings.class_embedding",), False
    yield "visual.positional_embedding", ("vision_model.embeddings.position_embedding.weight",), False
    yield "visual.proj", ("visual_projection.weight",), True
    yield "text.token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), False
    yield "text.positional_embedding", ("text_model.embeddings.position_embedding.weight",), False
    yield "text.text_projection", ("text_projection.weight",), True
    for ours_ln, theirs_ln in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("text.ln_final", "text_model.final_layer_norm"),
    ):
        for param in ("weight", "bias"):
            yield f"{ours_ln}.{param}", (f"{theirs_ln}.{param}",), False
    for src, dst, layers in (
        ("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
        ("text.transformer.resblocks", "text_model.encoder.layers", text_layers),
    ):
        for i in range(layers):
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            for param in ("weight", "bias"):
                yield f"{s}attn.in_proj_{param}", tuple(f"{d}self_attn.{p}.{param}" for p in _QKV), False
                for a, b in _BLOCK_RENAMES.items():
                    yield f"{s}{a}.{param}", (f"{d}{b}.{param}",), False


def _layers(config: CLIPConfig) -> tuple[int, int]:
    if not isinstance(config.vision, VisionTransformerConfig):
        raise CheckpointError(
            "CLIPModel's image tower is a Vision Transformer; this model's is a "
            f"{type(config.vision).__name__}, which the layout cannot hold"
        )
    return config.vision.layers, config.text.layers


# -------------------------------------------------------------------------------------------- ours → HF


def to_huggingface_state_dict(model: CLIP) -> dict[str, Tensor]:
    """The model's weights under CLIPModel's names: new contiguous CPU tensors, none sharing memory.
    `logit_scale` is clamped at the config's maximum, as our forward pass clamps it and CLIPModel's does not.
    Raises `CheckpointError` for a ViT-less model or a parameter that has no place in the layout."""
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    theirs: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, their_names, transposed in _tensor_pairs(*_layers(model.config)):
        tensor = ours[name]
        used.add(name)
        if name == "logit_scale":
            tensor = tensor.clamp(max=model.config.max_logit_scale)
        parts = tensor.chunk(len(their_names)) if len(their_names) > 1 else (tensor,)  # q, k, v: (width, …)
        for their_name, part in zip(their_names, parts, strict=True):
            theirs[their_name] = part.T if transposed else part
    left = sorted(set(ours) - used)
    if left:  # a tower grew a parameter that this mapping does not know: refuse rather than drop it
        raise CheckpointError(
            f"no place in CLIPModel's layout for {len(left)} parameters: {', '.join(left[:_MAX_LISTED])}"
        )
    return {k: v.cpu().contiguous().clone() for k, v in theirs.items()}


def huggingface_config(model: CLIP, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the `CLIPModel` (model_type "clip") equivalent to `model` (a ViT image tower)."""
    config = model.config
    _layers(config)
    vision, text = config.vision, config.text
    hidden_act = "quick_gelu" if config.quick_gelu else "gelu"
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach().clamp(max=config.max_logit_scale)),
        "initializer_factor": 1.0,
        "dtype": dtype_name,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": round(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": hidden_act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim,
            "bos_token_id": text.eot_token_id - 1,
            "eos_token_id": text.eot_token_id,
            "pad_token_id": text.eot_token_id,
            "dtype": dtype_name,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": round(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": hidden_act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim,
            "dtype": dtype_name,
        },
    }


# -------------------------------------------------------------------------------------------- HF → ours


def has_huggingface_names(names: Iterable[str]) -> bool:
    """Whether a state dict's keys are CLIPModel's (`vision_model.*`, `text_model.*`) rather than ours or
    OpenAI's."""
    return any(isinstance(n, str) and n.startswith(TOWER_PREFIXES) for n in names)


def config_from_huggingface(record: Mapping[str, Any]) -> CLIPConfig:
    """The `CLIPConfig` of a CLIPModel config.json (parsed). Raises `CheckpointError` naming what it
    cannot hold: another model type, an activation other than gelu/quick_gelu, another LayerNorm eps, or a
    missing field."""
    model_type = record.get("model_type")
    if model_type != "clip":
        raise CheckpointError(f'model_type is {model_type!r}, not "clip" (a CLIPModel)')
    text = _section(record, "text_config")
    vision = _section(record, "vision_config")
    activations = {_field(text, "hidden_act", "text_config"), _field(vision, "hidden_act", "vision_config")}
    if len(activations) != 1 or not activations <= {"gelu", "quick_gelu"}:
        raise CheckpointError(
            f"hidden_act {sorted(activations)}: our towers share one activation, gelu or quick_gelu"
        )
    for name, section in (("text_config", text), ("vision_config", vision)):
        eps = section.get("layer_norm_eps", LAYER_NORM_EPS)
        if eps != LAYER_NORM_EPS:
            raise CheckpointError(f"{name}.layer_norm_eps is {eps}; our LayerNorms use {LAYER_NORM_EPS}")
    if vision.get("num_channels", 3) != 3:
        raise CheckpointError(f"vision_config.num_channels is {vision['num_channels']}; ours reads RGB (3)")
    vocab_size = int(_field(text, "vocab_size", "text_config"))
    eos = int(_field(text, "eos_token_id", "text_config"))
    width = int(_field(vision, "hidden_size", "vision_config"))
    heads = int(_field(vision, "num_attention_heads", "vision_config"))
    if width % heads:
        raise CheckpointError(f"vision_config: hidden_size {width} is not a multiple of {heads} heads")
    text_width = int(_field(text, "hidden_size", "text_config"))
    try:
        return CLIPConfig(
            embed_dim=int(_field(record, "projection_dim", "config")),
            vision=VisionTransformerConfig(
                image_size=int(_field(vision, "image_size", "vision_config")),
                patch_size=int(_field(vision, "patch_size", "vision_config")),
                width=width,
                layers=int(_field(vision, "num_hidden_layers", "vision_config")),
                head_width=width // heads,
                mlp_ratio=int(_field(vision, "intermediate_size", "vision_config")) / width,
            ),
            text=TextTransformerConfig(
                context_length=int(_field(text, "max_position_embeddings", "text_config")),
                vocab_size=vocab_size,
                width=text_width,
                heads=int(_field(text, "num_attention_heads", "text_config")),
                layers=int(_field(text, "num_hidden_layers", "text_config")),
                mlp_ratio=int(_field(text, "intermediate_size", "text_config")) / text_width,
                # The legacy id pools at the largest token id: CLIP's end-of-text, the vocabulary's last.
                eot_token_id=vocab_size - 1 if eos == LEGACY_EOS_ID else eos,
            ),
            quick_gelu=activations == {"quick_gelu"},
        )
    except (TypeError, ValueError) as exc:  # a value our configs refuse (e.g. image size vs patch size)
        raise CheckpointError(f"the config describes no model of ours: {exc}") from exc


def _section(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = record.get(name)
    if not isinstance(section, Mapping):
        raise CheckpointError(f"the config has no {name!r} section")
    return section


def _field(section: Mapping[str, Any], key: str, where: str) -> Any:
    if section.get(key) is None:
        raise CheckpointError(f"the config's {where} has no {key!r}")
    return section[key]


def from_huggingface_state_dict(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A CLIPModel state dict under our names, for a model of `config` (see `config_from_huggingface`).
    Raises `CheckpointError` listing missing and unexpected tensors."""
    ours: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, their_names, transposed in _tensor_pairs(*_layers(config)):
        absent = [n for n in their_names if n not in state]
        if absent:
            missing += absent
            continue
        used.update(their_names)
        tensor = torch.cat([state[n] for n in their_names]) if len(their_names) > 1 else state[their_names[0]]
        ours[name] = tensor.T if transposed else tensor
    unexpected = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing[:_MAX_LISTED])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:_MAX_LISTED])}")
    if problems:
        raise CheckpointError("the weights do not fit the config's CLIPModel; " + "; ".join(problems))
    return ours


def model_from_huggingface(record: Mapping[str, Any], state: Mapping[str, Tensor]) -> CLIP:
    """A float32 CLIP model in eval mode from a CLIPModel's parsed config.json and its state dict.
    Raises `CheckpointError` for a config or weights that do not describe one of our models."""
    config = config_from_huggingface(record)
    model = CLIP(config)
    try:
        model.load_state_dict(from_huggingface_state_dict(state, config), strict=True)
    except RuntimeError as exc:  # shapes that contradict the config
        raise CheckpointError(f"the weights do not fit the config: {str(exc).strip()[:2000]}") from exc
    return model.float().eval()
