"""Export to the OpenAI/OpenCLIP layout: a round trip from one of our Lightning checkpoints back through
`load_model` gives the same embeddings, the activation survives, and a model the layout would read back
wrongly is refused by name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_support import perturbed_model, write_lightning_checkpoint

from clip_train.checkpoints import load_model
from clip_train.export import ExportError, export_model
from clip_train.export.openai_export import CONFIG_FILE, WEIGHTS_FILE
from clip_train.models import CLIP, build_model
from clip_train.models.openai_layout import read_openai_state_dict
from clip_train.tokenizer import Tokenizer


def embeddings(model: CLIP, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(images, Tokenizer()(["a red circle", "two cats on a mat!"]))
    return out.image_embeds, out.text_embeds


# exact GELU: not what an OpenAI-layout file is assumed to hold, so the metadata must carry it
@pytest.mark.parametrize(("name", "quick_gelu"), [("vit-tiny", False), ("rn-tiny", True)])
def test_round_trip_from_a_lightning_checkpoint(tmp_path: Path, name: str, quick_gelu: bool) -> None:
    model = perturbed_model(name=name, quick_gelu=quick_gelu)
    checkpoint = write_lightning_checkpoint(model, tmp_path / "last.ckpt")
    files = export_model(load_model(checkpoint), "openai", tmp_path / "openai")
    assert [f.path.name for f in files] == [WEIGHTS_FILE, CONFIG_FILE]
    state, _ = read_openai_state_dict(tmp_path / "openai" / WEIGHTS_FILE)
    assert "token_embedding.weight" in state and "visual.conv1.weight" in state  # OpenAI's names
    back = load_model(tmp_path / "openai" / WEIGHTS_FILE)
    assert back.config.quick_gelu is quick_gelu
    for got, expected in zip(embeddings(back, model.image_size), embeddings(model, model.image_size)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_open_clip_config_describes_the_model(tmp_path: Path) -> None:
    model = perturbed_model()
    export_model(model, "openai", tmp_path / "openai")
    record = json.loads((tmp_path / "openai" / CONFIG_FILE).read_text())
    cfg = record["model_cfg"]
    assert cfg["embed_dim"] == 64 and cfg["quick_gelu"] is False
    assert cfg["vision_cfg"] == {
        "image_size": 32,
        "layers": 2,
        "width": 128,
        "head_width": 64,
        "mlp_ratio": 4.0,
        "patch_size": 8,
    }
    assert cfg["text_cfg"]["heads"] == 1 and cfg["text_cfg"]["context_length"] == 77
    assert len(record["preprocess_cfg"]["mean"]) == 3


def test_fp16_round_trip(tmp_path: Path) -> None:
    model = perturbed_model(seed=3)
    files = export_model(model, "openai", tmp_path / "openai16", fp16=True)
    state, _ = read_openai_state_dict(files[0].path)
    assert {t.dtype for t in state.values()} == {torch.float16}
    back = load_model(files[0].path)
    for got, expected in zip(embeddings(back, 32), embeddings(model, 32)):
        assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.999


def test_inexpressible_model_is_refused_before_writing(tmp_path: Path) -> None:
    # Two text heads of width 32: the layout's loader infers heads = width // 64 = 1.
    model = build_model("vit-tiny", text={"heads": 2})
    out = tmp_path / "openai"
    with pytest.raises(ExportError, match=r"cannot export to the OpenAI/OpenCLIP layout: .*text\.heads=2"):
        export_model(model, "openai", out)
    assert not out.exists()
