"""OpenAI/OpenCLIP checkpoint layout: reproduction of the reference implementation's outputs (fixtures made
with open_clip_torch 3.3.0), architecture inference, exact round trips, and the errors on bad checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_train.models import CLIP, build_model
from clip_train.models.openai_layout import (
    CheckpointError,
    check_checkpoint_file,
    checkpoint_file_problem,
    config_from_openai_state_dict,
    load_openai_checkpoint,
    load_openai_state_dict,
    safe_torch_load,
    save_openai_checkpoint,
    to_openai_state_dict,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
REFERENCES = ["openai_vit_tiny.pt", "openai_rn_tiny.pt"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The models here are tiny: one intra-op thread is fastest, and on a shared 2-core machine several
    # threads spin against other processes' work (a 10x slowdown when the machine is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=REFERENCES)
def reference(request: pytest.FixtureRequest) -> dict:
    data = torch.load(FIXTURES / request.param, weights_only=True)
    data["path"] = FIXTURES / request.param
    return data


def outputs(model: CLIP, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(images, texts)
        return {
            "image_features": model.encode_image(images),
            "text_features": model.encode_text(texts),
            "logits_per_image": out.logit_scale * out.image_embeds @ out.text_embeds.T,
        }


# ---------------------------------------------------------------------------------- reference outputs


def test_reproduces_reference_outputs(reference: dict) -> None:
    model = load_openai_checkpoint(reference["path"])
    assert not model.training
    got = outputs(model, reference["images"], reference["texts"])
    for key, value in got.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-5, msg=key)


def test_infers_the_reference_architecture(reference: dict) -> None:
    config = config_from_openai_state_dict(reference["state_dict"])
    expected = reference["config"]
    assert config.embed_dim == expected["embed_dim"] and config.quick_gelu
    for key, value in expected["text"].items():
        assert getattr(config.text, key) == value, key
    for key, value in expected["vision"].items():
        assert getattr(config.vision, key) == (tuple(value) if isinstance(value, list) else value), key


def test_quick_gelu_flag_changes_the_activation(reference: dict) -> None:
    model = load_openai_checkpoint(reference["path"], quick_gelu=False)
    got = outputs(model, reference["images"], reference["texts"])
    assert not torch.allclose(got["text_features"], reference["text_features"], atol=1e-4)


def test_openclip_wrappers_and_openai_extras(tmp_path: Path, reference: dict) -> None:
    # OpenCLIP training checkpoints: {"state_dict": ..., "epoch": ...} with DDP's "module." prefix;
    # OpenAI's state dicts carry three non-parameter entries that the original loader drops.
    wrapped = {f"module.{k}": v for k, v in reference["state_dict"].items()}
    wrapped.update(
        input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(1)
    )
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": wrapped}, path)
    got = outputs(load_openai_checkpoint(path), reference["images"], reference["texts"])
    torch.testing.assert_close(got["logits_per_image"], reference["logits_per_image"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_of_the_reference_is_exact(tmp_path: Path, reference: dict, suffix: str) -> None:
    model = load_openai_checkpoint(reference["path"])
    saved = save_openai_checkpoint(model, tmp_path / f"model{suffix}")
    original = reference["state_dict"]
    if suffix == ".pt":
        written = torch.load(saved, weights_only=True)
        assert isinstance(written, dict) and all(isinstance(v, torch.Tensor) for v in written.values())
    state = to_openai_state_dict(load_openai_checkpoint(saved))
    assert sorted(state) == sorted(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", ["vit-tiny", "rn-tiny"])
def test_round_trip_of_our_models(tmp_path: Path, name: str) -> None:
    model = build_model(name, init_logit_bias=-10.0).eval()  # GELU, with a SigLIP bias
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
    saved = save_openai_checkpoint(model, tmp_path / "model.safetensors")
    loaded = load_openai_checkpoint(saved)  # the activation comes from the file's metadata
    assert loaded.config.quick_gelu is False
    images, tokens = (
        torch.randn(2, 3, model.image_size, model.image_size),
        torch.zeros(2, 77, dtype=torch.long),
    )
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49_406, 320, 49_407
    for key, value in outputs(model, images, tokens).items():
        assert torch.equal(outputs(loaded, images, tokens)[key], value), key
    assert loaded.logit_bias.item() == -10.0
    # A .pt file carries tensors only: the activation is the caller's to give.
    pt = save_openai_checkpoint(model, tmp_path / "model.pt")
    assert torch.equal(
        outputs(load_openai_checkpoint(pt, quick_gelu=False), images, tokens)["text_features"],
        outputs(model, images, tokens)["text_features"],
    )


def test_layout_names_match_openai() -> None:
    state = to_openai_state_dict(build_model("vit-tiny"))
    reference = torch.load(FIXTURES / "openai_vit_tiny.pt", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(reference)


def test_models_the_layout_cannot_express_are_refused(tmp_path: Path) -> None:
    two_heads = build_model("vit-tiny", text={"heads": 2})
    with pytest.raises(CheckpointError, match=r"text\.heads=2 would be read back as 1"):
        save_openai_checkpoint(two_heads, tmp_path / "x.pt")
    own_eot = build_model("vit-tiny", text={"vocab_size": 1000, "eot_token_id": 3})
    with pytest.raises(CheckpointError, match=r"eot_token_id=3 would be read back as 999"):
        to_openai_state_dict(own_eot)
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------------- bad checkpoints


@pytest.fixture()
def vit_state() -> dict[str, torch.Tensor]:
    return dict(torch.load(FIXTURES / "openai_vit_tiny.pt", weights_only=True)["state_dict"])


def test_missing_keys_are_listed(tmp_path: Path, vit_state: dict) -> None:
    del vit_state["visual.ln_post.bias"], vit_state["transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(vit_state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="missing keys: ") as refused:
        load_openai_checkpoint(tmp_path / "m.pt")
    listed = str(refused.value).split("missing keys: ", 1)[1]
    assert "visual.ln_post.bias" in listed and "transformer.resblocks.1.mlp.c_fc.bias" in listed
    with pytest.warns(UserWarning, match="2 missing keys keep their initial values"):
        model = load_openai_checkpoint(tmp_path / "m.pt", strict=False)
    assert torch.equal(model.visual.ln_pre.weight, vit_state["visual.ln_pre.weight"])


def test_unexpected_keys_are_listed(tmp_path: Path, vit_state: dict) -> None:
    vit_state["visual.extra_head.weight"] = torch.zeros(3)
    torch.save(vit_state, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.extra_head\.weight"):
        load_openai_checkpoint(tmp_path / "u.pt")
    with pytest.warns(UserWarning, match="1 unexpected keys ignored"):
        load_openai_checkpoint(tmp_path / "u.pt", strict=False)


def test_mis_shaped_tensors_are_listed(vit_state: dict) -> None:
    model = load_openai_state_dict(build_model("vit-tiny", quick_gelu=True), vit_state)
    vit_state["visual.ln_pre.weight"] = torch.zeros(64)
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped tensors: visual\.ln_pre\.weight: checkpoint \(64,\), "
        r"model \(128,\)",
    ):
        load_openai_state_dict(model, vit_state, strict=False)


def test_a_state_dict_of_another_model_is_refused(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=r"not an OpenAI/OpenCLIP CLIP state dict: missing \['token_embedding"
    ):
        load_openai_checkpoint(tmp_path / "other.pt")


def test_inconsistent_shapes_are_refused(vit_state: dict) -> None:
    vit_state["visual.positional_embedding"] = torch.zeros(16, 128)  # 15 patches: not a square grid
    with pytest.raises(CheckpointError, match="square number of positions"):
        config_from_openai_state_dict(vit_state)
    vit_state["ln_final.weight"] = torch.zeros(96)
    with pytest.raises(CheckpointError, match="text width 96 is not a multiple of 64"):
        config_from_openai_state_dict(vit_state)


class _Payload(nn.Module):
    """An arbitrary pickled object: loading it would run code, so weights_only refuses it."""


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_loading_runs_no_code(tmp_path: Path, vit_state: dict) -> None:
    torch.save({"state_dict": vit_state, "hook": _Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"cannot read .* as a PyTorch checkpoint: it holds ") as e:
        load_openai_checkpoint(tmp_path / "pickled.pt")
    # What was refused, on one line: not torch's page of advice to load the file with weights_only=False.
    assert str(e.value).endswith(
        "it holds other pickled objects, whose loading could run code (refused: Unsupported global: GLOBAL "
        "test_openai_layout._Payload was not an allowed global by default)"
    )
    scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(tmp_path / "jit.pt"))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_openai_checkpoint(tmp_path / "jit.pt")


def test_non_tensor_entries_and_missing_files(tmp_path: Path, vit_state: dict) -> None:
    torch.save({**vit_state, "note": "hello"}, tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match="entry 'note' is a str, not a tensor"):
        load_openai_checkpoint(tmp_path / "n.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_openai_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_openai_checkpoint(tmp_path / "absent.safetensors")


def _save_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), "it is a JPEG image"),
        ("model.pt", None, "it is a PNG image"),  # a PNG under a checkpoint's name
        ("notes.txt", "captions: a cat, a dog — ünïcode\n".encode() * 5, "it is a text file"),
        ("empty.ckpt", b"", "it is empty"),
        (
            "noise.bin",
            bytes([0, 255, 7, 1, 2, 3, 250, 9, 0, 0, 13]) * 8,
            "its first bytes are those of neither a zip archive, a pickle nor a safetensors header",
        ),
    ],
)
def test_files_that_are_no_checkpoint_are_named(
    tmp_path: Path, name: str, content: bytes | None, problem: str
) -> None:
    path = tmp_path / name
    if content is None:
        _save_png(path)
    else:
        path.write_bytes(content)
    assert checkpoint_file_problem(path) == problem
    message = f"{path} is not a PyTorch checkpoint or safetensors file: {problem}"
    with pytest.raises(CheckpointError) as refused:
        check_checkpoint_file(path)
    assert str(refused.value) == message
    # Loading says why in one line too, not torch's page ending in "load it with weights_only=False".
    with pytest.raises(CheckpointError) as refused:
        load_openai_checkpoint(path)
    assert str(refused.value) == f"{path} is not a PyTorch checkpoint: {problem}"
    renamed = path.rename(path.with_suffix(".safetensors"))
    with pytest.raises(CheckpointError) as refused:
        load_openai_checkpoint(renamed)
    assert str(refused.value) == f"cannot read {renamed} as safetensors: {problem}"


def test_checkpoint_files_pass_the_first_bytes_check(tmp_path: Path, vit_state: dict) -> None:
    torch.save(vit_state, tmp_path / "zip.pt")
    torch.save(vit_state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    model = build_model("vit-tiny")
    for path in (
        tmp_path / "zip.pt",
        tmp_path / "legacy.pt",
        save_openai_checkpoint(model, tmp_path / "m.safetensors"),
    ):
        assert checkpoint_file_problem(path) is None, path
        assert check_checkpoint_file(path) == path
        load_openai_checkpoint(path)  # and they load
    assert check_checkpoint_file(tmp_path) == tmp_path  # a folder is left to load_model to explain
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*absent\.pt"):
        check_checkpoint_file(tmp_path / "absent.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_safe_torch_load_names_what_the_file_should_have_been(tmp_path: Path) -> None:
    # The callers (search index, textness direction, checkpoints) pass their own noun for the messages.
    record = {"embeddings": torch.zeros(2, 3), "paths": ["a.jpg", "b.jpg"]}
    torch.save(record, tmp_path / "index.pt")
    assert safe_torch_load(tmp_path / "index.pt", what="search index")["paths"] == ["a.jpg", "b.jpg"]
    with pytest.raises(FileNotFoundError, match=r"^search index not found: .*absent\.pt$"):
        safe_torch_load(tmp_path / "absent.pt", what="search index")
    with pytest.raises(CheckpointError, match=r"^.* is a folder, not a search index$"):
        safe_torch_load(tmp_path, what="search index")
    (tmp_path / "notes.txt").write_text("a red square\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a search index: it is a text file$"):
        safe_torch_load(tmp_path / "notes.txt", what="search index")
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    with pytest.raises(CheckpointError, match=r"jit\.pt is a TorchScript archive .*, not a search index; "):
        safe_torch_load(tmp_path / "jit.pt", what="search index")
