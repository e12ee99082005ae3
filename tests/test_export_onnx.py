"""ONNX export of the image and text towers: onnxruntime agrees with PyTorch (max |Δ| ≤ 1e-4 in fp32, cosine
≥ 0.999 in fp16), the batch axis is dynamic, the check catches a graph that disagrees, the CLI reports
each tower's agreement and size, and the files beside the graphs are all a caller needs to run them."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from eval_support import write_lightning_checkpoint
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub: the tokenizer is read from the folder
import transformers  # after the variable above: huggingface_hub reads it on import

from clip_train.data.transforms import eval_transform, normalize_batch, stack_uint8
from clip_train.export import ExportError, OnnxTowerExport, export_model, export_onnx
from clip_train.export.cli import main
from clip_train.export.onnx_export import (
    FP16_MIN_COSINE,
    FP32_MAX_ABS_DIFF,
    check_onnx_tower,
    example_inputs,
)
from clip_train.models import CLIP, build_model
from clip_train.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # each tower takes the exporter 2-4 s


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def random_model(name: str, seed: int = 0) -> CLIP:
    """A model whose every tensor is distinct (fresh models have zero biases and unit LayerNorm gains)."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def vit() -> CLIP:
    return random_model("vit-tiny", seed=1)


@pytest.fixture(scope="module")
def vit_fp32(vit: CLIP, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tower → its export, of a whole ONNX export (graphs, metadata and tokenizer files) to one folder."""
    out = tmp_path_factory.mktemp("onnx_fp32")
    return {r.tower: r for r in export_model(vit, "onnx", out) if isinstance(r, OnnxTowerExport)}


def run_onnx(path: Path, inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {input_name: inputs.numpy()})


def test_fp32_towers_agree_with_pytorch(vit: CLIP, vit_fp32: dict) -> None:
    assert set(vit_fp32) == {"image", "text"}
    for tower, result in vit_fp32.items():
        assert result.path.name == f"{tower}_tower.onnx" and result.size_bytes > 0
        assert result.agreement.max_abs_diff <= FP32_MAX_ABS_DIFF, tower
        assert result.agreement.min_cosine >= FP16_MIN_COSINE, tower
    # The text tower holds the 49,408-token embedding: most of the model's bytes.
    assert vit_fp32["text"].size_bytes > 4 * 49_408 * 64


@pytest.mark.parametrize("batch_size", [1, 5])
def test_batch_axis_is_dynamic_and_outputs_match_encode(vit: CLIP, vit_fp32: dict, batch_size: int) -> None:
    images = example_inputs(vit, "image", batch_size, seed=7)
    tokens = example_inputs(vit, "text", batch_size, seed=7)
    image_embeds, image_features = run_onnx(vit_fp32["image"].path, images)
    text_embeds, text_features = run_onnx(vit_fp32["text"].path, tokens)
    with torch.no_grad():
        expected = {
            "image_features": vit.encode_image(images),
            "text_features": vit.encode_text(tokens),
        }
    for name, got in (("image_features", image_features), ("text_features", text_features)):
        assert got.shape == (batch_size, vit.config.embed_dim) and got.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(got), expected[name], rtol=0, atol=1e-4, msg=name)
    torch.testing.assert_close(
        torch.from_numpy(image_embeds), F.normalize(expected["image_features"], dim=-1), rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(np.linalg.norm(text_embeds, axis=1), 1.0, atol=1e-5)


def test_check_catches_a_graph_that_disagrees(vit: CLIP, vit_fp32: dict) -> None:
    changed = copy.deepcopy(vit)
    with torch.no_grad():
        changed.visual.proj.mul_(1.0 + torch.randn_like(changed.visual.proj))
    with pytest.raises(ExportError, match=r"image tower disagrees with PyTorch: max \|Δ\|"):
        check_onnx_tower(changed, "image", vit_fp32["image"].path)


def test_unknown_tower_is_refused(vit: CLIP, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"towers must be .*image, text.*'audio'"):
        export_onnx(vit, tmp_path, towers=["audio"])


def test_fp16_via_cli_from_a_lightning_checkpoint(
    vit: CLIP, vit_fp32: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_lightning_checkpoint(vit, tmp_path / "last.ckpt")
    out = tmp_path / "onnx16"
    assert main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--fp16"]) == 0
    printed = capsys.readouterr().out
    assert "as onnx fp16" in printed.splitlines()[0]
    summary = printed.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"exported 8 files \(.+ MB\) to {re.escape(str(out))} in [\d.]+ s: "
        r"image_tower_fp16\.onnx [\d.]+ MB, text_tower_fp16\.onnx [\d.]+ MB, onnx_config\.json [\d.]+ KB, "
        r"vocab\.json [\d.]+ KB, merges\.txt [\d.]+ KB, .*preprocessor_config\.json \d+ B",
        summary,
    ), summary
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["weights"] == "fp16"
    assert config["image_tower"]["file"] == "image_tower_fp16.onnx"
    assert config["text_tower"]["file"] == "text_tower_fp16.onnx"
    for tower in ("image", "text"):
        path = out / f"{tower}_tower_fp16.onnx"
        # float16 weights: about half the fp32 file
        assert 0.4 < path.stat().st_size / vit_fp32[tower].size_bytes < 0.6, tower
        cosine = re.search(rf"{tower}_tower_fp16\.onnx: .* min cosine ([\d.]+)", printed)
        assert cosine and float(cosine.group(1)) >= FP16_MIN_COSINE
        # The graph takes and returns float32 (casts at its boundaries) and agrees with float32 PyTorch.
        inputs = example_inputs(vit, tower, 4, seed=11)
        embeds, _ = run_onnx(path, inputs)
        assert embeds.dtype == np.float32
        with torch.no_grad():
            expected = F.normalize(vit.encode_image(inputs) if tower == "image" else vit.encode_text(inputs))
        assert F.cosine_similarity(torch.from_numpy(embeds), expected).min() >= FP16_MIN_COSINE


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_resnet_image_tower(tmp_path: Path, fp16: bool) -> None:
    model = random_model("rn-tiny", seed=2)
    (result,) = export_onnx(model, tmp_path, towers=["image"], fp16=fp16)
    assert result.path.name == ("image_tower_fp16.onnx" if fp16 else "image_tower.onnx")
    if fp16:
        assert result.agreement.min_cosine >= FP16_MIN_COSINE
    else:
        assert result.agreement.max_abs_diff <= FP32_MAX_ABS_DIFF
    embeds, _ = run_onnx(result.path, example_inputs(model, "image", 1, seed=3))
    assert embeds.shape == (1, model.config.embed_dim)


def _textured_image(width: int, height: int) -> Image.Image:
    """Gradients and a sine pattern: a crop or resize that is off shows as several grey levels."""
    y, x = np.mgrid[0:height, 0:width]
    pattern = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    rgb = np.stack([255 * x / width, 255 * y / height, pattern], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def test_the_graphs_run_from_the_files_beside_them(vit: CLIP, vit_fp32: dict, tmp_path: Path) -> None:
    """A caller without clip_train: onnx_config.json, numpy/PIL for the image, CLIPTokenizer on the
    vocabulary files for the text, onnxruntime for the graphs."""
    folder = vit_fp32["image"].path.parent
    config = json.loads((folder / "onnx_config.json").read_text())
    pre, tok = config["image_preprocessing"], config["tokenizer"]

    # Image: RGB, short side to image_size (bicubic), centre crop, / 255, (x - mean) / std, channels first.
    _textured_image(75, 48).save(tmp_path / "photo.png")
    image = Image.open(tmp_path / "photo.png").convert(pre["convert"])
    size = pre["resize_shortest_edge"]
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    crop_h, crop_w = pre["center_crop"]
    left, top = round((resized.width - crop_w) / 2), round((resized.height - crop_h) / 2)
    cropped = np.asarray(resized.crop((left, top, left + crop_w, top + crop_h)), dtype=np.float32)
    pixels = (cropped * pre["rescale_factor"] - pre["mean"]) / pre["std"]
    images = pixels.transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, S, S)

    # Text: the BPE vocabulary (vocab.json, merges.txt) with its tokenizer_config.json, padded and cut to the
    # context length. (CLIPTokenizer pads with end-of-text where ours pads with 0: the features are the same.)
    assert (folder / tok["vocab_file"]).is_file() and (folder / tok["merges_file"]).is_file()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    texts = ["a photo of a cat", "a gradient with stripes", "two dogs " * 60]
    tokens = tokenizer(
        texts, padding="max_length", truncation=True, max_length=tok["context_length"], return_tensors="np"
    )["input_ids"].astype(np.int64)

    def run(tower: str, inputs: np.ndarray) -> np.ndarray:
        entry = config[f"{tower}_tower"]
        session = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
        return session.run([next(iter(entry["outputs"]))], {entry["input"]["name"]: inputs})[0]

    image_embeds, text_embeds = run("image", images), run("text", tokens)
    probabilities = torch.from_numpy(config["logit_scale"] * image_embeds @ text_embeds.T).softmax(dim=1)

    # The same as our model on our own preprocessing and tokenizer.
    ours_pixels = normalize_batch(stack_uint8([eval_transform(vit.image_size).crop(image)]))
    # PIL's bicubic against torch's antialiased one: within 2 grey levels (as in the Hugging Face export's).
    assert np.abs(images - ours_pixels.numpy()).max() * 255 * max(pre["std"]) <= 2.0 + 1e-3
    with torch.no_grad():
        out = vit(ours_pixels, Tokenizer(context_length=vit.context_length)(texts))
    expected = (out.logit_scale * out.image_embeds @ out.text_embeds.T).softmax(dim=1)
    torch.testing.assert_close(torch.from_numpy(text_embeds), out.text_embeds, rtol=0, atol=1e-4)
    assert F.cosine_similarity(torch.from_numpy(image_embeds), out.image_embeds).min() > 0.999
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=2e-3)
