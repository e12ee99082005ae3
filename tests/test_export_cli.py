"""`python -m clip_train.export`: --help, the plan and summary lines, and a clear error (exit status 2 from
the real entry point) for a checkpoint that is not a CLIP, an unknown format, an occupied output folder and a
model the format cannot express."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_support import write_lightning_checkpoint

from clip_train.checkpoints import CheckpointError
from clip_train.export import ExportError, check_output_dir, export_model
from clip_train.export.cli import main
from clip_train.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return write_lightning_checkpoint(build_model("vit-tiny"), tmp_path_factory.mktemp("ckpt") / "last.ckpt")


def test_help_names_the_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "--checkpoint",
        "--format",
        "--out",
        "--fp16",
        "--overwrite",
        "onnx",
        "openai",
        "huggingface",
    ):
        assert word in text


def test_help_states_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    # The audit's finding: "(default: None)" on required options and defaults stated twice.
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    # An option's entry starts at a line indented by 2, then "-" (the first split part is the heading's end).
    entries = re.split(r"\n  (?=-)", text)[1:]
    assert len(entries) == 8  # the premise: -h and the 7 options
    for entry in entries:
        entry = " ".join(entry.split())
        assert len(re.findall(r"\(default", entry)) <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    assert "(default auto:" in text


def test_plan_and_summary(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(checkpoint), "--format", "huggingface", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(
        f"exporting {checkpoint} (ViT image tower, 3.7 M parameters) as huggingface fp32"
    )
    assert lines[-1].startswith("exported 7 files (")
    assert "model.safetensors 14.8 MB" in lines[-1] and "vocab.json" in lines[-1]


def test_not_a_clip_checkpoint_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_train.export",
            "--checkpoint",
            str(path),
            "--format",
            "openai",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "not an OpenAI/OpenCLIP CLIP state dict" in result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_clip_checkpoint_in_process(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)  # a plain dict of tensors, but not a CLIP's
    # The reason, not only the file name (which every CheckpointError message holds): what a CLIP state
    # dict needs and what the file has instead.
    with pytest.raises(
        CheckpointError,
        match=r"other\.pt: not an OpenAI/OpenCLIP CLIP state dict: missing \['token_embedding\.weight', "
        r".*\(found 1 keys: weights\)",
    ):
        main(["--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_jpeg_as_checkpoint_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100))
    with pytest.raises(SystemExit) as exit_info:  # refused while the arguments are parsed
        main(["--checkpoint", str(photo), "--format", "onnx", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    expected = f"{photo} is not a PyTorch checkpoint or safetensors file: it is a JPEG image"
    assert capsys.readouterr().err.endswith(f"error: argument --checkpoint: {expected}\n")
    assert not (tmp_path / "out").exists()


def test_unknown_format(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--format", "tflite", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(
        ExportError, match=r"unknown export format 'tflite'; formats: onnx, openai, huggingface"
    ):
        export_model(build_model("vit-tiny"), "tflite", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_occupied_output_folder_needs_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--checkpoint", str(checkpoint), "--format", "openai", "--out", str(out)]
    with pytest.raises(ExportError, match=r"out exists and is not empty.*--overwrite") as refused:
        main(args)
    # In the CLI's words only: the library's "overwrite=True" means nothing to its user.
    assert "overwrite=True" not in str(refused.value)
    assert str(refused.value).startswith(f"--out {out} exists and is not empty; choose a new folder")
    # The library's own refusal names its keyword argument instead.
    with pytest.raises(ExportError, match=r"^the output folder .* not empty; .* pass overwrite=True to "):
        check_output_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"  # files of other names are left alone
    assert (out / "open_clip_model.safetensors").is_file()


def test_output_path_that_is_a_file(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(ExportError, match=r"a_file exists and is not a folder"):
        main(["--checkpoint", str(checkpoint), "--format", "openai", "--out", str(path), "--overwrite"])


def test_resnet_to_huggingface(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = write_lightning_checkpoint(build_model("rn-tiny"), tmp_path / "rn.ckpt")
    with pytest.raises(ExportError, match=r"Hugging Face CLIPModel.*modified ResNet"):
        main(["--checkpoint", str(path), "--format", "huggingface", "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_files_have_the_mode_of_any_new_file(checkpoint: Path, tmp_path: Path, umask: int) -> None:
    # The .safetensors weights included, which safetensors itself writes readable by their owner alone.
    previous = os.umask(umask)
    try:
        for format in ("openai", "huggingface"):
            out = tmp_path / format
            assert main(["--checkpoint", str(checkpoint), "--format", format, "--out", str(out)]) == 0
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
            assert any(name.endswith(".safetensors") for name in modes)
            assert modes == dict.fromkeys(modes, 0o666 & ~umask), format
    finally:
        os.umask(previous)
