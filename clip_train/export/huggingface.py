"""Export to a Hugging Face `transformers` `CLIPModel` folder, loadable with `CLIPModel.from_pretrained(dir)`.

Files: config.json, model.safetensors, the tokenizer (vocab.json and merges.txt derived from our BPE merges
file, tokenizer_config.json, special_tokens_map.json) and preprocessor_config.json (CLIPImageProcessor:
short-side bicubic resize, centre crop, CLIP's normalisation, as our evaluation transform does).

Written without importing transformers (a test dependency only). The weights and config.json follow
`clip_train.models.huggingface_layout`, which `clip_train.checkpoints.load_model` reads back:
`get_image_features` / `get_text_features` then return our `encode_image` / `encode_text` (projected,
unnormalised). CLIPModel has no ResNet image tower and no logit bias: such models are refused by name.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clip_train.data.transforms import CLIP_MEAN, CLIP_STD
from clip_train.export.files import ExportedFile, ExportError
from clip_train.models import CLIP, ModifiedResNetConfig, huggingface_layout
from clip_train.models.huggingface_layout import (
    CONFIG_FILE,
    LEGACY_EOS_ID,
    WEIGHTS_FILE,
    to_huggingface_state_dict,
)
from clip_train.models.openai_layout import CheckpointError, save_safetensors
from clip_train.tokenizer import EOT_TEXT, SOT_TEXT, WORD_END, Tokenizer, bytes_to_unicode, read_merges


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
    if text.eot_token_id == LEGACY_EOS_ID and text.vocab_size - 1 != LEGACY_EOS_ID:
        raise ExportError(
            f"cannot export to Hugging Face CLIPModel: end-of-text id {LEGACY_EOS_ID} makes "
            "CLIPTextModel pool text at the largest token id instead of at the end-of-text token"
        )
    if tokenizer is not None:
        check_tokenizer_fits(model, tokenizer)


def check_tokenizer_fits(model: CLIP, tokenizer: Tokenizer) -> None:
    """Raise `ExportError` when the tokenizer whose files an export writes is not the model's: another
    vocabulary size or end-of-text id."""
    text = model.config.text
    if tokenizer.vocab_size != text.vocab_size or tokenizer.eot_token_id != text.eot_token_id:
        raise ExportError(
            f"the tokenizer ({tokenizer.bpe_path}: {tokenizer.vocab_size} tokens, end-of-text id "
            f"{tokenizer.eot_token_id}) does not fit the model ({text.vocab_size} tokens, end-of-text id "
            f"{text.eot_token_id}); pass the BPE merges file the model was trained with"
        )


def huggingface_config(model: CLIP, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the `CLIPModel` (model_type "clip") equivalent to `model`."""
    check_huggingface_expressible(model)
    return huggingface_layout.huggingface_config(model, dtype=dtype)


def huggingface_state_dict(model: CLIP) -> dict[str, Tensor]:
    """The model's weights under CLIPModel's names: new contiguous CPU tensors, none sharing memory."""
    check_huggingface_expressible(model)
    try:
        return to_huggingface_state_dict(model)
    except CheckpointError as exc:
        raise ExportError(f"cannot export to Hugging Face CLIPModel: {exc}") from exc


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
        CONFIG_FILE: json.dumps(huggingface_config(model, dtype=dtype), indent=2) + "\n",
        **huggingface_tokenizer_files(tokenizer, model.context_length),
        "preprocessor_config.json": json.dumps(image_processor_config(model.image_size), indent=2) + "\n",
    }
    save_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    files = [ExportedFile(out / WEIGHTS_FILE, f"weights, CLIPModel, {'fp16' if fp16 else 'fp32'}")]
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        files.append(ExportedFile(out / name, name.removesuffix(".json").removesuffix(".txt")))
    return files
