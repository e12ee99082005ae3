"""`load_model` reads OpenAI-layout files, our Lightning checkpoints, our own model files and Hugging Face
CLIPModel folders into the same model, and refuses files of the wrong kind, and folders, with a message
naming them and what to pass instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_support import perturbed_model, tiny_model, write_lightning_checkpoint

from clip_train.checkpoints import (
    CheckpointError,
    check_checkpoint_path,
    clip_config_from_dict,
    clip_config_to_dict,
    load_model,
    save_model,
)
from clip_train.export import export_model
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


# ------------------------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize(
    ("quick_gelu", "fp16"), [(False, False), (True, True)], ids=["gelu-fp32", "quick_gelu-fp16"]
)
def test_our_huggingface_export_loads_back(inputs, tmp_path, quick_gelu, fp16):
    model = perturbed_model(seed=5, quick_gelu=quick_gelu)
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    out = tmp_path / "hf"
    export_model(model, "huggingface", out, fp16=fp16)
    # The folder, and its weights file alone (the config.json beside it describes the architecture).
    for path in (out, out / "model.safetensors"):
        assert check_checkpoint_path(path) == path
        loaded = load_model(path)
        assert loaded.config == model.config  # activation, heads, end-of-text id included
        assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
        if fp16:  # float16 weights: the same model within their rounding
            images, tokens = inputs
            with torch.no_grad():
                for a, b in (
                    (model.encode_image(images), loaded.encode_image(images)),
                    (model.encode_text(tokens), loaded.encode_text(tokens)),
                ):
                    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
        else:  # every tensor back where it came from, bit for bit
            ours, back = model.state_dict(), loaded.state_dict()
            assert ours.keys() == back.keys()
            for name in ours:
                assert torch.equal(ours[name], back[name]), name
            _same_outputs(model, loaded, inputs)


def test_huggingface_weights_without_their_config_are_named(model, tmp_path):
    out = tmp_path / "hf"
    export_model(model, "huggingface", out)
    (out / "config.json").unlink()
    weights = out / "model.safetensors"
    expected = (
        f"{weights} holds a Hugging Face CLIPModel's weights, whose architecture is in the config.json "
        "written beside them, and there is none: pass the folder with both files"
    )
    for check in (check_checkpoint_path, load_model):
        with pytest.raises(CheckpointError) as refused:
            check(weights)
        assert str(refused.value) == expected
    with pytest.raises(CheckpointError) as refused:
        load_model(out)
    assert str(refused.value) == (
        f"{out} holds model.safetensors but no config.json: a Hugging Face CLIPModel folder needs both "
        "(sharded weights are not read)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "siglip"}, "model_type is 'siglip', not \"clip\" (a CLIPModel)"),
        (
            {"text_config": {"hidden_act": "gelu_new"}},
            "hidden_act ['gelu', 'gelu_new']: our towers share one",
        ),
        (
            {"vision_config": {"layer_norm_eps": 1e-6}},
            "vision_config.layer_norm_eps is 1e-06; our LayerNorms",
        ),
        (
            {"vision_config": {"num_hidden_layers": None}},
            "the config's vision_config has no 'num_hidden_layers'",
        ),
        ({"text_config": {"num_hidden_layers": 3}}, "missing 16 tensors: text_model.encoder.layers.2."),
    ],
    ids=["model-type", "activation", "eps", "missing-field", "more-layers"],
)
def test_huggingface_config_it_cannot_hold_is_one_line(model, tmp_path, change, message):
    out = tmp_path / "hf"
    export_model(model, "huggingface", out)
    config = json.loads((out / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as refused:
        load_model(out)
    text = str(refused.value)
    assert text.startswith(f"{out / 'model.safetensors'} (Hugging Face CLIPModel weights, with ")
    assert message in text and "\n" not in text


def test_a_folder_that_is_no_checkpoint_says_what_to_pass(model, tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("step-00000040.ckpt", "last.ckpt"):
        write_lightning_checkpoint(model, run / "checkpoints" / name)
    for folder, files in ((run, run / "checkpoints"), (run / "checkpoints", run / "checkpoints")):
        expected = (
            f"{folder} is a folder, not a checkpoint: pass one of its checkpoint files "
            f"({files / 'last.ckpt'}, {files / 'step-00000040.ckpt'}), or a Hugging Face CLIPModel folder "
            "(config.json + model.safetensors)"
        )
        for check in (check_checkpoint_path, load_model):
            with pytest.raises(CheckpointError) as refused:
                check(folder)
            assert str(refused.value) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match=r"empty is a folder, not a checkpoint: pass a checkpoint file, or"
    ):
        load_model(empty)
