"""Export to a Hugging Face `transformers` `CLIPModel` folder, loadable with `CLIPModel.from_pretrained(dir)`.

Files: config.json, model.safetensors, the tokenizer (vocab.json and merges.txt derived from our BPE merges
file, tokenizer_config.json, special_tokens_map.json) and preprocessor_config.json (CLIPImageProcessor:
short-side bicubic resize, centre crop, CLIP's normalisation, as our evaluation transform does).

Written without importing transformers (a test dependency only). The correspondence, ours → theirs:

* `visual.*` → `vision_model.*`: conv1 → embeddings.patch_embedding, class_embedding and positional_embedding
  → embeddings.*, ln_pre → pre_layrnorm (sic), ln_post → post_layernorm; `visual.proj` (width, D) →
  `visual_projection.weight` (D, width).
* `text.*` → `text_model.*`: token_embedding / positional_embedding → embeddings.*, ln_final →
  final_layer_norm; `text.text_projection` (width, D) → `text_projection.weight` (D, width).
* Each block: the fused `attn.in_proj_*` splits into `self_attn.{q,k,v}_proj.*`; ln_1/ln_2 → layer_norm1/2,
  mlp.c_fc/c_proj → mlp.fc1/fc2.
* quick_gelu → hidden_act "quick_gelu", else "gelu" (both exact GELU); LayerNorm eps 1e-5 as torch's.
* Text pooling: HF reads the first position of `eos_token_id` (for any id but 2, which selects the legacy
  argmax of the ids), exactly our first end-of-text position, so `eos_token_id` = our `eot_token_id`.

`get_image_features` / `get_text_features` then return our `encode_image` / `encode_text` (projected,
unnormalised). CLIPModel has no ResNet image tower and no logit bias: such models are refused by name.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from clip_train.data.transforms import CLIP_MEAN, CLIP_STD
from clip_train.export.files import ExportedFile, ExportError
from clip_train.models import CLIP, ModifiedResNetConfig
from clip_train.tokenizer import EOT_TEXT, SOT_TEXT, WORD_END, Tokenizer, bytes_to_unicode, read_merges

WEIGHTS_FILE = "model.safetensors"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which our towers use
_HF_LEGACY_EOS_ID = 2  # CLIPTextModel pools at argmax(input_ids) when eos_token_id is 2
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_MAX_LISTED = 10


def check_huggingface_expressible(model: CLIP, tokenizer: Tokenizer | None = None) -> None:
    """Raise `ExportError` naming what `CLIPModel` (or CLIPTokenizer, given our `tokenizer`) cannot hold."""
    config = model.config
    if isinstance(config.vision, ModifiedResNetConfig):
        raise ExportError(
            "cannot export to Hugging Face CLIPModel: its image tower (CLIPVisionModel) is a Vision "
            "Transformer, and this model's image tower is a modified ResNet (ModifiedResNetConfig), which it "
            "cannot express. Export this model with --format onnx or --format openai instead"
        )
    if model.logit_bias is not None:
        raise ExportError(
            "cannot export to Hugging Face CLIPModel: this model has a learned logit bias (SigLIP-style), "
            "which CLIPModel has no parameter for; its logits would silently differ"
        )
    text = config.text
    if text.eot_token_id == _HF_LEGACY_EOS_ID and text.vocab_size - 1 != _HF_LEGACY_EOS_ID:
        raise ExportError(
            f"cannot export to Hugging Face CLIPModel: end-of-text id {_HF_LEGACY_EOS_ID} makes "
            "CLIPTextModel pool text at the largest token id instead of at the end-of-text token"
        )
    if tokenizer is not None and (
        tokenizer.vocab_size != text.vocab_size or tokenizer.eot_token_id != text.eot_token_id
    ):
        raise ExportError(
            f"the tokenizer ({tokenizer.bpe_path}: {tokenizer.vocab_size} tokens, end-of-text id "
            f"{tokenizer.eot_token_id}) does not fit the model ({text.vocab_size} tokens, end-of-text id "
            f"{text.eot_token_id}); pass the BPE merges file the model was trained with"
        )


def huggingface_config(model: CLIP, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the `CLIPModel` (model_type "clip") equivalent to `model`."""
    check_huggingface_expressible(model)
    config = model.config
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


def huggingface_state_dict(model: CLIP) -> dict[str, Tensor]:
    """The model's weights under CLIPModel's names: new contiguous CPU tensors, none sharing memory."""
    check_huggingface_expressible(model)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        used.add(name)
        return ours[name]

    theirs: dict[str, Tensor] = {
        "logit_scale": take("logit_scale").clamp(max=model.config.max_logit_scale),
        "vision_model.embeddings.patch_embedding.weight": take("visual.conv1.weight"),
        "vision_model.embeddings.class_embedding": take("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": take("visual.positional_embedding"),
        "visual_projection.weight": take("visual.proj").T,  # (D, width)
        "text_model.embeddings.token_embedding.weight": take("text.token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": take("text.positional_embedding"),
        "text_projection.weight": take("text.text_projection").T,  # (D, width)
    }
    for ours_ln, theirs_ln in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("text.ln_final", "text_model.final_layer_norm"),
    ):
        for param in ("weight", "bias"):
            theirs[f"{theirs_ln}.{param}"] = take(f"{ours_ln}.{param}")
    for src, dst, layers in (
        ("visual.transformer.resblocks", "vision_model.encoder.layers", model.config.vision.layers),
        ("text.transformer.resblocks", "text_model.encoder.layers", model.config.text.layers),
    ):
        for i in range(layers):
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            for param in ("weight", "bias"):
                q, k, v = take(f"{s}attn.in_proj_{param}").chunk(3)  # each (width, width) or (width,)
                theirs[f"{d}self_attn.q_proj.{param}"] = q
                theirs[f"{d}self_attn.k_proj.{param}"] = k
                theirs[f"{d}self_attn.v_proj.{param}"] = v
                for a, b in _BLOCK_RENAMES.items():
                    theirs[f"{d}{b}.{param}"] = take(f"{s}{a}.{param}")
    left = sorted(set(ours) - used)
    if left:  # a tower grew a parameter that this mapping does not know: refuse rather than drop it
        raise ExportError(
            f"cannot export to Hugging Face CLIPModel: no place for {len(left)} parameters: "
            f"{', '.join(left[:_MAX_LISTED])}"
        )
    return {k: v.cpu().contiguous().clone() for k, v in theirs.items()}


def huggingface_tokenizer_files(tokenizer: Tokenizer, context_length: int | None = None) -> dict[str, str]:
    """File name → text of the CLIPTokenizer files equivalent to `tokenizer`: the same ids up to and
    including end-of-text (kept last when truncating to the context length); padding is end-of-text where
    ours is 0. CLIPTokenizer does not run ftfy or HTML unescaping, so texts with mojibake or HTML entities
    (e.g. "&amp;") can tokenize differently; plain text does not. `context_length` (default the
    tokenizer's) is the length CLIPTokenizer truncates to: the model's context length."""
    merges = read_merges(tokenizer.bpe_path)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + WORD_END for s in byte_symbols), *("".join(m) for m in merges)]
    tokens += [SOT_TEXT, EOT_TEXT]
    vocab = {token: i for i, token in enumerate(tokens)}  # a later duplicate wins, as in Tokenizer
    if len(tokens) != tokenizer.vocab_size or vocab[EOT_TEXT] != tokenizer.eot_token_id:
        raise ExportError(
            f"the merges file {tokenizer.bpe_path} gives {len(tokens)} tokens, but the tokenizer has "
            f"{tokenizer.vocab_size}"
        )
    # CLIPTokenizer matches every special token inside the text, so padding with our id 0 ("!") would turn
    # each "!" of a caption into id 0. It pads with end-of-text instead, as OpenAI's own CLIPTokenizer files
    # do: the ids agree with ours up to the end-of-text token, and the features do not depend on what follows
    # it (causal attention, pooling at the first end-of-text).
    special = {"bos_token": SOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length or tokenizer.context_length,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def image_processor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json for CLIPImageProcessor, as `clip_train.data.transforms.eval_transform`."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


def export_huggingface(
    model: CLIP, out_dir: str | Path, *, fp16: bool = False, tokenizer: Tokenizer | None = None
) -> list[ExportedFile]:
    """Write a `CLIPModel` folder to `out_dir` (which must exist): float16 weights with `fp16`; the
    tokenizer files from `tokenizer` (default: `Tokenizer` with the model's context length and the
    default merges file). Raises `ExportError` for a model CLIPModel cannot express, before writing."""
    if tokenizer is None:
        tokenizer = Tokenizer(context_length=model.context_length)
    check_huggingface_expressible(model, tokenizer)
    out = Path(out_dir)
    dtype = torch.float16 if fp16 else torch.float32
    state = huggingface_state_dict(copy.deepcopy(model).to(dtype) if fp16 else model)
    texts = {
        "config.json": json.dumps(huggingface_config(model, dtype=dtype), indent=2) + "\n",
        **huggingface_tokenizer_files(tokenizer, model.context_length),
        "preprocessor_config.json": json.dumps(image_processor_config(model.image_size), indent=2) + "\n",
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    files = [ExportedFile(out / WEIGHTS_FILE, f"weights, CLIPModel, {'fp16' if fp16 else 'fp32'}")]
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        files.append(ExportedFile(out / name, name.removesuffix(".json").removesuffix(".txt")))
    return files
