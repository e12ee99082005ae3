"""`load_model` reads OpenAI-layout files, our Lightning checkpoints and our own model files into the same
model, and refuses files of the wrong kind with a message naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_support import tiny_model, write_lightning_checkpoint

from clip_train.checkpoints import (
    CheckpointError,
    clip_config_from_dict,
    clip_config_to_dict,
    load_model,
    save_model,
)
from clip_train.models import build_model, get_model_config
from clip_train.models.openai_layout import save_openai_checkpoint
from clip_train.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=3)
    with torch.no_grad():  # a non-default temperature, so that it is seen to be carried over
        m.logit_scale.fill_(2.5)
    return m


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32), Tokenizer()(["a red circle", "two cats"])


def _same_outputs(a, b, inputs) -> None:
    images, tokens = inputs
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(images), b.encode_image(images))
        torch.testing.assert_close(a.encode_text(tokens), b.encode_text(tokens))
    assert a.logit_scale.item() == b.logit_scale.item()
    assert not b.training


@pytest.mark.parametrize("name", ["vit-tiny", "rn-tiny", "ViT-B/32", "RN50x4"])
def test_config_record_round_trip(name):
    config = get_model_config(name)
    record = clip_config_to_dict(config)
    assert record["vision"]["type"] in ("vit", "resnet")
    assert not any(isinstance(v, tuple) for v in record["vision"].values())  # plain YAML/JSON
    assert clip_config_from_dict(record) == config


def test_config_record_rejects_unknown_fields():
    record = clip_config_to_dict(get_model_config("vit-tiny"))
    record["vision"]["wings"] = 2
    with pytest.raises(CheckpointError, match="wings"):
        clip_config_from_dict(record)
    record = clip_config_to_dict(get_model_config("vit-tiny"))
    record["vision"]["type"] = "mlp"
    with pytest.raises(CheckpointError, match=r"vision\.type"):
        clip_config_from_dict(record)


def test_openai_safetensors(model, inputs, tmp_path):
    path = save_openai_checkpoint(model, tmp_path / "m.safetensors")
    _same_outputs(model, load_model(path), inputs)


def test_openai_torch_file(model, inputs, tmp_path):
    # A .pt does not record the activation: OpenAI's QuickGELU unless told otherwise.
    path = save_openai_checkpoint(model, tmp_path / "m.pt")
    assert load_model(path).config.quick_gelu is True
    _same_outputs(model, load_model(path, quick_gelu=False), inputs)


def test_lightning_checkpoint(model, inputs, tmp_path):
    path = write_lightning_checkpoint(model, tmp_path / "step-00000042.ckpt")
    loaded = load_model(path)
    assert loaded.config == model.config
    _same_outputs(model, loaded, inputs)


def test_compiled_lightning_checkpoint(model, inputs, tmp_path):
    path = write_lightning_checkpoint(model, tmp_path / "c.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {
        k.replace("model.", "model._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, path)
    _same_outputs(model, load_model(path), inputs)


def test_lightning_checkpoint_without_config_is_inferred(model, inputs, tmp_path):
    path = write_lightning_checkpoint(model, tmp_path / "old.ckpt", with_config=False)
    with pytest.warns(UserWarning, match="no 'clip_config'"):
        loaded = load_model(path)
    _same_outputs(model, loaded, inputs)


def test_own_model_file(inputs, tmp_path):
    resnet = tiny_model(seed=4, name="rn-tiny")
    path = save_model(resnet, tmp_path / "rn.pt")
    loaded = load_model(path)
    assert loaded.config == resnet.config
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(resnet.encode_image(images), loaded.encode_image(images))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        load_model(tmp_path / "nope.ckpt")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights")
    with pytest.raises(
        CheckpointError, match=r"notes\.pt is not a PyTorch checkpoint: it is a text file\. Expected an "
    ):
        load_model(path)


def test_state_dict_of_another_model(tmp_path):
    path = tmp_path / "classifier.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"classifier\.pt.*not an OpenAI/OpenCLIP CLIP state dict"):
        load_model(path)


class _WritesMarker:
    """Pickles as a call to open(marker, "w"): unpickling it creates the marker file, as a malicious
    checkpoint's payload would run its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    # Beside real tensors, so that the file looks like a state dict until the payload is reached.
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    message = str(refused.value)
    assert message.startswith(f"cannot read {path} as a PyTorch checkpoint: it holds ")
    assert "GLOBAL io.open" in message  # names what was refused: torch's reason, not its advice
    assert "\x1b[" not in message and "\n" not in message  # one plain line for the CLIs' `error:` output
    assert not marker.exists()
    # The premise: the payload is live, so only the weights-only loading kept it from running.
    torch.load(path, weights_only=False)["payload"].close()  # the file object open() returned
    assert marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(build_model("vit-tiny"), path)  # torch.save(model) rather than of its state dict
    with pytest.raises(
        CheckpointError,
        match=r"cannot read .*whole_model\.pt as a PyTorch checkpoint: it holds .*GLOBAL "
        r"clip_train\.models\.\S*CLIP\b",
    ):
        load_model(path)


def test_wrong_weights_for_recorded_config(model, tmp_path):
    path = write_lightning_checkpoint(model, tmp_path / "mixed.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["clip_config"] = clip_config_to_dict(get_model_config("rn-tiny"))
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"mixed\.ckpt.*do not fit"):
        load_model(path)


def test_list_in_a_checkpoint_file(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"list\.ckpt"):
        load_model(path)


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_corrupt_safetensors_file(model, tmp_path, damage):
    path = save_openai_checkpoint(model, tmp_path / "broken.safetensors")
    if damage == "text":
        path.write_text("these are not weights")
    else:  # a download cut short: a valid header, half the tensor data
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*broken\.safetensors as safetensors"):
        load_model(path)
