"""Hugging Face export: the folder loads in transformers' CLIPModel and CLIPTokenizer (offline, from the local
folder only) and gives our embeddings and our token ids; models CLIPModel cannot express are refused by name
before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import write_lightning_checkpoint
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: from_pretrained reads the folder only
import transformers  # after the variable above: huggingface_hub reads it on import

from clip_train.checkpoints import load_model
from clip_train.data.transforms import CLIP_STD, eval_transform, normalize_batch, stack_uint8
from clip_train.export import ExportError, export_model
from clip_train.models import CLIP, build_model
from clip_train.tokenizer import Tokenizer

CAPTIONS = [
    "a photo of a cat",
    "Two DOGS   playing in the snow!!  Wow!",
    "naïve café — 3 croissants, 12.5 € (déjà vu)",
    "it's a long caption " * 30,  # truncated to the context length, end-of-text kept last
]


def random_model(seed: int = 0, **overrides: object) -> CLIP:
    """A vit-tiny whose every tensor is distinct (fresh models have zero biases and unit LayerNorm gains)."""
    torch.manual_seed(seed)
    model = build_model("vit-tiny", **overrides).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
        model.logit_scale.fill_(3.1)
    return model


def features(output: object) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projection; 4.x the tensor itself
    return getattr(output, "pooler_output", output)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return Tokenizer()(CAPTIONS)


@pytest.mark.slow  # the first test here pays for importing transformers' CLIP (~3 s)
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_clipmodel_gives_our_embeddings(tmp_path: Path, tokens: torch.Tensor, quick_gelu: bool) -> None:
    model = random_model(seed=int(quick_gelu), quick_gelu=quick_gelu)
    checkpoint = write_lightning_checkpoint(model, tmp_path / "last.ckpt")
    out = tmp_path / "hf"
    files = export_model(load_model(checkpoint), "huggingface", out)
    assert {f.path.name for f in files} == {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    }
    hf, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    hf.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            features(hf.get_image_features(pixel_values=images)),
            model.encode_image(images),
            rtol=0,
            atol=1e-4,
        )
        torch.testing.assert_close(
            features(hf.get_text_features(input_ids=tokens)), model.encode_text(tokens), rtol=0, atol=1e-4
        )
        out_hf = hf(input_ids=tokens, pixel_values=images)
        ours = model(images, tokens)
        torch.testing.assert_close(out_hf.image_embeds, ours.image_embeds, rtol=0, atol=1e-4)
        torch.testing.assert_close(
            out_hf.logits_per_image,
            ours.logit_scale * ours.image_embeds @ ours.text_embeds.T,
            atol=1e-4,
            rtol=0,
        )


def test_clip_tokenizer_gives_our_ids(tmp_path: Path, tokens: torch.Tensor) -> None:
    model = random_model()
    export_model(model, "huggingface", tmp_path / "hf")
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    eot = model.config.text.eot_token_id
    unpadded = hf_tokenizer(CAPTIONS, truncation=True)["input_ids"]
    for i, ids in enumerate(unpadded):
        end = tokens[i].tolist().index(eot)
        assert ids == tokens[i, : end + 1].tolist(), CAPTIONS[i]
    assert len(unpadded[-1]) == model.context_length  # the long caption was cut, end-of-text kept
    # Padded to the context length, CLIPTokenizer pads with end-of-text where ours pads with 0; the text
    # features do not depend on the padding.
    padded = hf_tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert padded.shape == tokens.shape
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(tokens), rtol=0, atol=1e-6)


def textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, a sine pattern and noise: a crop off by a pixel, another resampling filter or other
    normalisation constants all change the processed pixels by several grey levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pattern = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    rgb = np.stack([255 * x / width, 255 * y / height, pattern], axis=-1)
    rgb += rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIP, Path]:
    model = random_model()
    out = tmp_path_factory.mktemp("exported")
    export_model(model, "huggingface", out)
    return model, out


# Landscape and portrait: the short-side resize and the centre crop act on different axes.
@pytest.mark.parametrize("size", [(97, 61), (61, 97)], ids=["landscape", "portrait"])
def test_image_processor_gives_our_evaluation_pixels(
    exported: tuple[CLIP, Path], size: tuple[int, int]
) -> None:
    model, folder = exported
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    image = textured_image(*size)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, S, S)
    ours = normalize_batch(stack_uint8([eval_transform(model.image_size).crop(image)]))
    assert theirs.shape == ours.shape == (1, 3, model.image_size, model.image_size)
    # Compared in grey levels (undoing the division by std). Ours resizes with torch's antialiased bicubic
    # kernel, theirs with PIL's bicubic (or torchvision's, which is torch's), and each rounds to uint8:
    # within 2 levels anywhere (1 measured), 0.1 on average (0.01 measured). Another filter (bilinear,
    # Lanczos), a crop shifted by a pixel or other mean/std constants are off by 6 levels or more.
    levels = ((theirs - ours) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 2.0 + 1e-3 and levels.mean() <= 0.1, (levels.max(), levels.mean())


def test_a_folder_transformers_wrote_loads_as_our_model(exported: tuple[CLIP, Path], tmp_path: Path) -> None:
    # transformers' own config.json and weights (its names, its choice of fields), not only ours.
    model, folder = exported
    transformers.CLIPModel.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert loaded.config == model.config
    ours, back = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[name], back[name]) for name in ours)


def test_fp16_export(tmp_path: Path, tokens: torch.Tensor) -> None:
    model = random_model(seed=4)
    files = export_model(model, "huggingface", tmp_path / "hf16", fp16=True)
    config = json.loads((tmp_path / "hf16" / "config.json").read_text())
    assert config["dtype"] == "float16"
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf16", dtype=torch.float32).eval()
    with torch.no_grad():
        got = features(hf.get_text_features(input_ids=tokens))
        cosine = torch.nn.functional.cosine_similarity(got, model.encode_text(tokens))
    assert cosine.min() >= 0.999
    weights = next(f for f in files if f.path.name == "model.safetensors")
    assert weights.size_bytes < 2.1 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (
            lambda: build_model("rn-tiny"),
            r"image tower is a modified ResNet.*--format onnx or --format openai",
        ),
        (lambda: build_model("vit-tiny", init_logit_bias=-10.0), r"learned logit bias"),
        (
            lambda: build_model("vit-tiny", text={"vocab_size": 1000, "eot_token_id": 999}),
            r"tokenizer .*49408 tokens.* does not fit the model \(1000 tokens",
        ),
    ],
    ids=["resnet", "logit_bias", "other_vocabulary"],
)
def test_inexpressible_models_are_refused_before_writing(tmp_path: Path, model, problem: str) -> None:
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match=problem):
        export_model(model(), "huggingface", out)
    assert not out.exists()
