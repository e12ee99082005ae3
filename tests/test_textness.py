"""The textness direction: the probe on a constructed case, steering that lowers and raises the share of
text-bearing results, the saved file, the CLI on a real (tiny) model, and the one-class error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_support import jpeg_bytes
from PIL import Image

from clip_train.checkpoints import save_model
from clip_train.models import build_model
from clip_train.textness import (
    TextnessDirection,
    TextnessError,
    build_parser,
    fit_textness,
    main,
    render_word,
    steer,
    steered_top_k,
    text_share,
)


def _constructed(seed: int = 0, n: int = 200, dim: int = 16):
    """Image embeddings where half the images carry text: their embedding leans along a hidden unit vector
    u; queries are unrelated unit vectors."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(dim, generator=g), dim=0)
    base = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    has_text = torch.arange(n) % 2 == 1
    images = F.normalize(base + 1.5 * has_text[:, None] * u, dim=1)
    queries = F.normalize(torch.randn(8, dim, generator=g), dim=1)
    return images, has_text, queries, u


def test_the_probe_finds_the_hidden_text_direction():
    images, has_text, _, u = _constructed()
    direction = fit_textness(images[has_text], images[~has_text])
    assert direction.accuracy > 0.9
    assert float(direction.vector @ u) > 0.9
    assert direction.vector.norm().item() == pytest.approx(1.0)


def test_a_negative_scale_lowers_the_share_of_text_bearing_results_and_a_positive_one_raises_it():
    images, has_text, queries, _ = _constructed()
    direction = fit_textness(images[has_text], images[~has_text]).vector
    share = text_share(steered_top_k(queries, images, direction, [-2, -1, 0, 1, 2], k=10), has_text).mean(
        dim=1
    )
    assert 0.0 < share[2] < 1.0  # unsteered: a mix
    assert share[0] < share[2] < share[4], share.tolist()  # lowered by -2, raised by +2
    assert (share.diff() >= 0).all(), share.tolist()  # and monotone in the scale
    assert share[0] <= 0.05 and share[4] >= 0.95
    steered = steer(queries, direction, 2.0)
    assert torch.allclose(steered.norm(dim=1), torch.ones(8))


def test_a_probe_trained_on_one_class_only_is_refused():
    images, has_text, _, _ = _constructed()
    with pytest.raises(TextnessError, match="one class only"):
        fit_textness(images[has_text], images[:0])
    with pytest.raises(TextnessError, match="one class only"):
        fit_textness(images[:0], images)


def test_the_direction_round_trips_beside_its_checkpoint_and_checks_the_model(tmp_path):
    images, has_text, _, _ = _constructed()
    direction = fit_textness(images[has_text], images[~has_text])
    path = direction.save(TextnessDirection.path_for(tmp_path / "last.ckpt"))
    assert path == tmp_path / "last.textness.pt" and path.with_suffix(".json").is_file()
    loaded = TextnessDirection.load(path, embed_dim=16)
    assert torch.equal(loaded.vector, direction.vector) and loaded.accuracy == direction.accuracy
    with pytest.raises(TextnessError, match="16-d direction but the model embeds into 64"):
        TextnessDirection.load(path, embed_dim=64)


def test_a_file_that_is_no_direction_is_refused_in_one_line(tmp_path):
    notes, other, pickled = tmp_path / "notes.txt", tmp_path / "other.pt", tmp_path / "pickled.pt"
    notes.write_text("not a direction\n")
    torch.save({"vector": torch.zeros(4)}, other)
    torch.save({"direction": torch.zeros(4), "summary": Image.new("RGB", (1, 1))}, pickled)
    expected = {
        notes: f"{notes} is not a textness direction: it is a text file",
        other: f"{other} is not a textness direction written by TextnessDirection.save: it holds no "
        "'direction' and 'summary' entries",
        pickled: f"cannot read {pickled} as a textness direction: it holds other pickled objects",
    }
    for path, message in expected.items():
        with pytest.raises(TextnessError) as refused:
            TextnessDirection.load(path)
        # Not torch's page of advice to load the file unsafely.
        assert str(refused.value).startswith(message) and "\n" not in str(refused.value), str(refused.value)
    with pytest.raises(FileNotFoundError, match=r"^textness direction not found: .*absent\.pt$"):
        TextnessDirection.load(tmp_path / "absent.pt")


def test_rendering_draws_the_word_on_a_copy():
    image = Image.new("RGB", (96, 96), (120, 130, 140))
    out = render_word(image, "hello", __import__("random").Random(0))
    changed = (np.asarray(out).astype(int) - np.asarray(image).astype(int)).any(axis=2).mean()
    assert 0.02 < changed < 0.6
    assert (np.asarray(image) == (120, 130, 140)).all()  # the original is untouched


@pytest.mark.slow
def test_the_cli_trains_saves_and_evaluates_a_direction_on_a_real_model(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(48):
        Image.open(io.BytesIO(jpeg_bytes(i, 64))).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    checkpoint = save_model(build_model("vit-tiny"), tmp_path / "model.pt")
    assert main(["train", "--checkpoint", str(checkpoint), "--images", str(folder)]) == 0
    assert (tmp_path / "model.textness.pt").is_file()
    out_dir = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--images", str(folder), "--queries", "dog,tree"]
    assert main([*args, "--out", str(out_dir)]) == 0
    assert (out_dir / "textness_dog.png").is_file() and (out_dir / "textness_tree.png").is_file()
    record = json.loads((out_dir / "textness_eval.json").read_text())
    assert record["scales"] == [-2, -1, 0, 1, 2] and len(record["share"]) == 5
    assert record["mean_share"][0] < record["mean_share"][-1]
    assert "written to" in capsys.readouterr().out


def test_an_empty_image_folder_is_said_to_hold_no_images(tmp_path):
    # Not "needs images with and without text, got none": nothing was found at all. A checkpoint-shaped
    # file suffices, as the images are looked for before the model is loaded.
    checkpoint = tmp_path / "model.pt"
    torch.save({}, checkpoint)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    for command in (["train"], ["evaluate", "--queries", "dog", "--out", str(tmp_path / "o")]):
        argv = [*command, "--checkpoint", str(checkpoint), "--images", str(tmp_path / "empty")]
        with pytest.raises(TextnessError) as refused:
            main(argv)
        assert str(refused.value).startswith(f"no images found in {tmp_path / 'empty'} (image files: .jpg, ")


def test_every_option_has_help_with_its_default(tmp_path, capsys):
    # The help of each option ends with its default, right before the next option's name.
    next_option = {"train": "--words", "evaluate": "--queries"}
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--seed SEED seed of " in text and f"(default 0) {next_option[command]}" in text
    assert "--scales SCALES comma-separated steering scales" in text and "(default -2,-1,0,1,2;" in text
    assert "--k K top-k images per query and scale" in text and "(default 10) --out" in text
    checkpoint = tmp_path / "m.pt"
    torch.save({}, checkpoint)  # checkpoint-shaped: --checkpoint is checked while the arguments are parsed
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--images", "x", "--queries", "a", "--out", "o"]
    with pytest.raises(TextnessError, match=r"--scales takes comma-separated numbers, e\.g\. --scales=-2"):
        main([*argv, "--scales=1,a"])
