"""The eval, predict and search CLIs, run in-process (and predict once as a subprocess) on a tiny saved
model, images written with PIL."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_support import (
    COLOURS,
    perturbed_model,
    tiny_model,
    write_captioned_folder,
    write_colour_folder,
    write_labelled_shards,
)
from PIL import Image

from clip_train import eval as eval_cli
from clip_train import predict, search, textness
from clip_train.checkpoints import load_model, save_model
from clip_train.data.transforms import eval_transform, normalize_batch, stack_uint8
from clip_train.evaluation import (
    ImageRef,
    caption_probabilities,
    evaluate_linear_probe,
    evaluate_zero_shot,
    image_folder,
    load_templates,
    split_classification_set,
)
from clip_train.evaluation.cli_common import run
from clip_train.evaluation.embedding import embed_images, embed_texts, tokenizer_for
from clip_train.evaluation.zero_shot import ZeroShotResult, classification_metrics
from clip_train.export import cli as export_cli
from clip_train.export import export_model
from clip_train.models.openai_layout import save_openai_checkpoint
from clip_train.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_model(tiny_model(seed=11), root / "model.pt")
    write_colour_folder(root / "colours", per_class=2)
    write_captioned_folder(root / "caps", [["a red square", "red"], ["two green dots"], ["blue"]])
    write_labelled_shards(root / "shards", per_class=2)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    return root


def _fails(main, argv: list[str], capsys) -> str:
    return _refused(main, argv, capsys)[1]


def _checkpoint_refused(err: str, message: str) -> bool:
    """Whether stderr is argparse's refusal of --checkpoint with `message`: the usage, then one error line."""
    return err.startswith("usage: ") and err.endswith(f": error: argument --checkpoint: {message}\n")


def _refused(main, argv: list[str], capsys) -> tuple[str, str]:
    """(stdout, stderr) of a run that ends with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    return captured.out, captured.err


def _help_entries(text: str) -> dict[str, str]:
    """Option → its help text on one line, from an argparse --help (an entry starts at a line indented by
    2 spaces and a dash; the lines indented further continue it)."""
    entries: dict[str, str] = {}
    option = None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            entries[option] = line
        elif option is not None and line.startswith("   "):
            entries[option] += " " + line.strip()
    return entries


@pytest.mark.parametrize(
    ("module", "argv", "names"),
    [
        (
            eval_cli,
            ["--help"],
            {"--checkpoint", "--imagefolder", "--shards", "--classnames", "--templates", "--retrieval-folder"}
            | {"--retrieval-shards", "--linear-probe", "--probe-train", "--out"},
        ),
        (predict, ["--help"], {"--checkpoint", "--text", "--texts-file", "--top", "--json"}),
        (search, ["--help"], {"index", "query"}),
        (search, ["index", "--help"], {"--checkpoint", "--images", "--shards", "--out"}),
        (search, ["query", "--help"], {"--index", "--top-k", "--out", "--checkpoint"}),
    ],
    ids=["eval", "predict", "search", "search-index", "search-query"],
)
def test_help(module, argv: list[str], names: set[str], capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 0
    # Whole words of the help (argparse may wrap a hyphenated name inside a description, never in the
    # option list), stripped of the usage line's brackets and separators.
    words = {word.strip("[](){},|") for word in capsys.readouterr().out.split()}
    assert names <= words, names - words


@pytest.mark.parametrize(
    ("module", "argv"),
    [(eval_cli, []), (predict, []), (search, ["index"]), (search, ["query"])],
    ids=["eval", "predict", "search-index", "search-query"],
)
def test_help_states_each_default_once(module, argv: list[str], capsys):
    # The audit's finding: "(default 64) (default: 64)", "(default: None)" on required options.
    with pytest.raises(SystemExit):
        module.main([*argv, "--help"])
    entries = _help_entries(capsys.readouterr().out)
    assert "--checkpoint" in entries or "--index" in entries  # the premise: the entries were found
    for entry in entries.values():
        assert len(re.findall(r"\(default", entry)) <= 1, entry
        assert "(default: None)" not in entry and "(default: )" not in entry, entry
    if module is eval_cli:
        assert "(default: single)" in entries["--templates"]
        assert "(default 0.3)" in entries["--probe-test-fraction"]
        # What a newcomer with digit folders needs to find: where class names come from, how to change them.
        assert "in place of the folder's name (default: the sub-folder names" in entries["--classnames"]
        assert 'one template inline, e.g. "a photo of the number {}."' in entries["--templates"]


def test_eval_writes_report_and_plots(material, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "--checkpoint",
        str(material / "model.pt"),
        "--imagefolder",
        str(material / "colours"),
        "--templates",
        "imagenet80",
        "--retrieval-folder",
        str(material / "caps"),
        "--out",
        str(out),
    ]
    assert eval_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("evaluating ") and "zero-shot top-1" in printed.splitlines()[-1]
    # 3 classes: every image's class is among the top 5, so top-5 says nothing and is left out.
    assert "top-5 left out (only 3 classes" in printed.splitlines()[-1]
    report = json.loads((out / "report.json").read_text())
    assert report["zero_shot"]["top5"] is None and "only 3 classes" in report["zero_shot"]["top5_omitted"]
    expected = evaluate_zero_shot(
        tiny_model(seed=11), image_folder(material / "colours"), load_templates("imagenet80")
    )
    assert report["zero_shot"]["top1"] == pytest.approx(expected.metrics.top1)
    assert report["zero_shot"]["confusion_matrix"] == expected.metrics.confusion.tolist()
    assert report["zero_shot"]["num_templates"] == 80
    assert set(report["retrieval"]) >= {"image_to_text_R@1", "text_to_image_R@10"}
    for png in ("confusion_matrix.png", "per_class_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("num_classes", [5, 6])
def test_top5_is_reported_with_more_than_5_classes_only(num_classes: int):
    logits = torch.randn(30, num_classes, generator=torch.Generator().manual_seed(0))
    # Each image's class is its lowest-scoring one: outside the top 5 of 6 classes, inside the top 5 of 5.
    labels = logits.argmin(dim=1)
    metrics = classification_metrics(logits, labels)
    classnames = [f"class{i}" for i in range(num_classes)]
    result = ZeroShotResult("synthetic", classnames, 1, metrics, logits.argmax(dim=1), logits.softmax(dim=1))
    report = eval_cli.zero_shot_report(result)
    if num_classes == 6:
        assert report["top5"] == 0.0 and "top5_omitted" not in report
    else:
        assert metrics.top5 == 1.0  # the premise: whatever the scores
        assert report["top5"] is None
        assert report["top5_omitted"] == "only 5 classes: every image's class is among the top 5"
    assert report["top1"] == 0.0 and json.dumps(report)  # the rest as before, and JSON-safe


def test_eval_prints_its_class_names_and_takes_them_from_a_file(material, tmp_path, capsys):
    # Digits as class folders (holding the red, green and blue images): the text tower reads "0", "1", "2"
    # unless a class-name file names them.
    digits = tmp_path / "digits"
    for digit, colour in enumerate(COLOURS):
        shutil.copytree(material / "colours" / colour, digits / str(digit))
    base = ["--checkpoint", str(material / "model.pt"), "--imagefolder", str(digits)]
    assert eval_cli.main([*base, "--out", str(tmp_path / "folders")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == (
        "class names from the sub-folder names (name them with --classnames FILE): '0', '1', '2'"
    )
    report = json.loads((tmp_path / "folders" / "report.json").read_text())
    assert report["zero_shot"]["classnames"] == ["0", "1", "2"]

    names = tmp_path / "colour_words.txt"
    names.write_text("red\ngreen\nblue\n")
    template = "a photo of the colour {}."  # inline: not a file, not a built-in set
    out = tmp_path / "named"
    assert eval_cli.main([*base, "--classnames", str(names), "--templates", template, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "1 template(s)" in printed[0]
    assert printed[1] == f"class names from {names}: 'red', 'green', 'blue'"
    report = json.loads((out / "report.json").read_text())
    assert report["zero_shot"]["classnames"] == ["red", "green", "blue"]
    assert report["templates"] == template and report["zero_shot"]["num_templates"] == 1
    # The names and the template were the ones prompted with: the library on the same inputs agrees.
    expected = evaluate_zero_shot(tiny_model(seed=11), image_folder(digits, list(COLOURS)), [template])
    assert report["zero_shot"]["confusion_matrix"] == expected.metrics.confusion.tolist()
    assert report["zero_shot"]["top1"] == pytest.approx(expected.metrics.top1)


def test_eval_refuses_a_single_class(material, tmp_path, capsys):
    folder = tmp_path / "one"
    (folder / "red").mkdir(parents=True)
    (folder / "red" / "a.jpg").write_bytes((material / "colours" / "red" / "red_0.jpg").read_bytes())
    argv = ["--checkpoint", str(material / "model.pt"), "--imagefolder", str(folder)]
    out, err = _refused(eval_cli.main, [*argv, "--out", str(tmp_path / "o")], capsys)
    assert err == (f"error: {folder} has only 1 class (red): zero-shot classification needs at least 2\n")
    assert out == "" and not (tmp_path / "o").exists()


def _not_checkpoints(folder: Path, material: Path) -> dict[str, tuple[Path, str]]:
    """Files given by mistake as a checkpoint or index: name → (path, what the error must call it)."""
    photo = folder / "photo.jpg"
    photo.write_bytes((material / "colours" / "red" / "red_0.jpg").read_bytes())
    notes = folder / "notes.txt"
    notes.write_text("a red square\n")
    renamed = folder / "model.pt"  # the extension of a checkpoint, the bytes of a PNG
    Image.new("RGB", (8, 8)).save(renamed, format="PNG")
    return {
        "jpeg": (photo, "a JPEG image"),
        "text": (notes, "a text file"),
        "png": (renamed, "a PNG image"),
    }


def test_a_file_that_is_no_checkpoint_is_named_before_anything_runs(material, tmp_path, capsys):
    image = str(material / "colours" / "red" / "red_0.jpg")
    colours, index = str(material / "colours"), str(tmp_path / "i.pt")
    for path, kind in _not_checkpoints(tmp_path, material).values():
        expected = f"{path} is not a PyTorch checkpoint or safetensors file: it is {kind}"
        # (main, the words before --checkpoint, those after it)
        runs = [
            (eval_cli.main, [], ["--imagefolder", colours, "--out", str(tmp_path / "o")]),
            (predict.main, [], [image, "a cat"]),
            (search.main, ["index"], ["--images", colours, "--out", index]),
            (search.main, ["query"], ["--index", index, "a cat", "--out", str(tmp_path / "q")]),
            (textness.main, ["train"], ["--images", colours]),
            (export_cli.main, [], ["--format", "onnx", "--out", str(tmp_path / "e")]),
        ]
        for main, before, after in runs:
            out, err = _refused(main, [*before, "--checkpoint", str(path), *after], capsys)
            # Refused while parsing, in one short line without torch's advice to load the file unsafely;
            # no plan line before it.
            assert _checkpoint_refused(err, expected), (main.__module__, err)
            assert out == "", (main.__module__, out)
    assert not any((tmp_path / name).exists() for name in ("o", "i.pt", "q", "e"))


def test_eval_on_labelled_shards(material, tmp_path, capsys):
    pattern = str(material / "shards" / "shard-{000000..000001}.tar")
    out = tmp_path / "r"
    argv = [
        "--checkpoint",
        str(material / "model.pt"),
        "--shards",
        pattern,
        "--classnames",
        str(material / "classes.txt"),
        "--out",
        str(out),
    ]
    assert eval_cli.main(argv) == 0
    assert json.loads((out / "report.json").read_text())["zero_shot"]["num_samples"] == 6


def test_eval_linear_probe_on_a_held_out_part_and_on_a_training_folder(material, tmp_path, capsys):
    folder = write_colour_folder(tmp_path / "colours", per_class=6)
    base = ["--checkpoint", str(material / "model.pt"), "--imagefolder", str(folder)]
    assert eval_cli.main([*base, "--linear-probe", "--out", str(tmp_path / "split")]) == 0
    printed = capsys.readouterr().out
    assert "linear probe trained on 'colours[train]' (12 images)" in printed
    assert "linear probe top-1" in printed.splitlines()[-1]
    report = json.loads((tmp_path / "split" / "report.json").read_text())["linear_probe"]
    assert (report["num_train"], report["num_test"]) == (12, 6)
    # The same protocol through the library, on the same weights and the same split.
    expected = evaluate_linear_probe(
        tiny_model(seed=11), *split_classification_set(image_folder(folder), 0.3)
    )
    assert report["accuracy"] == pytest.approx(expected.accuracy)
    assert report["l2"] == expected.l2 and len(report["validation_accuracy"]) == 6

    train = write_colour_folder(tmp_path / "train", per_class=4, seed_offset=50)
    out = tmp_path / "trained"
    assert eval_cli.main([*base, "--probe-train", str(train), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())["linear_probe"]
    assert (report["train"], report["num_train"], report["num_test"]) == ("train", 12, 18)
    assert 0.0 <= report["accuracy"] <= 1.0


def test_eval_linear_probe_bad_inputs(material, tmp_path, capsys):
    base = ["--checkpoint", str(material / "model.pt"), "--out", str(tmp_path / "o")]
    err = _fails(
        eval_cli.main, [*base, "--retrieval-folder", str(material / "caps"), "--linear-probe"], capsys
    )
    assert "--linear-probe needs a classification set" in err
    other = tmp_path / "other"
    for name in ("cyan", "magenta", "yellow"):
        (other / name).mkdir(parents=True)
        (other / name / "a.png").write_bytes((material / "colours" / "red" / "red_0.jpg").read_bytes())
    err = _fails(
        eval_cli.main,
        [*base, "--imagefolder", str(material / "colours"), "--probe-train", str(other)],
        capsys,
    )
    assert "--probe-train" in err and "must be the classification set's classes" in err


def test_eval_bad_inputs(material, tmp_path, capsys):
    base = [
        "--checkpoint",
        str(material / "model.pt"),
        "--imagefolder",
        str(material / "colours"),
        "--out",
        str(tmp_path / "o"),
    ]
    out, err = _refused(eval_cli.main, ["--checkpoint", "nowhere.ckpt", *base[2:]], capsys)
    assert _checkpoint_refused(err, "checkpoint not found: nowhere.ckpt"), err
    assert out == ""  # the plan line ("evaluating nowhere.ckpt…") would contradict the error
    bad = tmp_path / "bad_templates.txt"
    bad.write_text("a photo of a thing.\n")
    err = _fails(eval_cli.main, [*base, "--templates", str(bad)], capsys)
    assert "bad_templates.txt:1" in err and "{}" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    err = _fails(
        eval_cli.main,
        [
            *base[:2],
            "--shards",
            str(material / "shards" / "shard-000000.tar"),
            "--classnames",
            str(empty),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "empty.txt: the class list is empty" in err
    broken = write_colour_folder(tmp_path / "broken", per_class=1, bad=["blue_0.jpg"])
    err = _fails(
        eval_cli.main, [*base[:2], "--imagefolder", str(broken), "--out", str(tmp_path / "o")], capsys
    )
    assert "image does not decode" in err and "blue_0.jpg" in err
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(2, 2)}, wrong)
    assert "wrong.pt" in _fails(eval_cli.main, ["--checkpoint", str(wrong), *base[2:]], capsys)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{truncat")
    err = _fails(eval_cli.main, ["--checkpoint", str(corrupt), *base[2:]], capsys)
    assert "corrupt.safetensors as safetensors" in err and "Traceback" not in err


def test_predict_ranks_texts_for_each_image(material, capsys, tmp_path):
    # An OpenAI-layout file works too (our model uses exact GELU, which that layout does not record).
    checkpoint = save_openai_checkpoint(tiny_model(seed=11), tmp_path / "m.safetensors")
    texts = ["a red thing", "a blue thing", "two cats and remotes"]
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--json",
        str(material / "colours" / "red" / "red_0.jpg"),
        str(material / "colours" / "blue"),
        "--",
        *texts,
    ]
    assert predict.main(argv) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["red_0.jpg", "blue_0.jpg", "blue_1.jpg"]
    for row in rows:
        probabilities = [p["probability"] for p in row["predictions"]]
        assert sorted(p["text"] for p in row["predictions"]) == sorted(texts)
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(
            1, abs=1e-4
        )
    assert (
        captured.err.startswith("scoring 3 text(s) against 3 image(s)") and "most often best" in captured.err
    )


def test_predict_without_separator_takes_existing_images_and_the_rest_as_texts(material, capsys):
    # The form: no `--`; an option may also follow the texts.
    image = str(material / "colours" / "red" / "red_0.jpg")
    texts = ["a cat", "cats", "two cats and remotes"]
    argv = ["--checkpoint", str(material / "model.pt"), image, str(material / "colours" / "blue"), *texts]
    assert predict.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["red_0.jpg", "blue_0.jpg", "blue_1.jpg"]
    assert all(sorted(p["text"] for p in r["predictions"]) == sorted(texts) for r in rows)
    assert captured.err.startswith("scoring 3 text(s) against 3 image(s)")


def test_predict_json_equals_the_library_and_the_models_forward_pass(material, capsys):
    images = [material / "colours" / c / f"{c}_{i}.jpg" for c in ("red", "green") for i in (0, 1)]
    texts = ["a red thing", "a green thing", "two cats and remotes"]
    argv = ["--checkpoint", str(material / "model.pt"), "--json", *map(str, images), *texts]
    assert predict.main(argv) == 0
    cli = torch.tensor(
        [
            [{p["text"]: p["probability"] for p in json.loads(line)["predictions"]}[t] for t in texts]
            for line in capsys.readouterr().out.splitlines()
        ]
    )  # (4 images, 3 texts)
    model = load_model(material / "model.pt")
    library = caption_probabilities(model, [ImageRef(str(p)) for p in images], texts)
    torch.testing.assert_close(cli, library, atol=1e-6, rtol=0)  # the CLI prints 6 decimals

    # Independently of the embedding helpers: the model's forward pass on the evaluation transform.
    transform = eval_transform(model.image_size)
    batch = normalize_batch(stack_uint8([transform.crop(Image.open(p).convert("RGB")) for p in images]))
    with torch.no_grad():
        out = model(batch, Tokenizer(context_length=model.context_length)(texts))
    expected = (out.logit_scale * out.image_embeds @ out.text_embeds.T).softmax(dim=1)
    torch.testing.assert_close(library, expected, atol=1e-5, rtol=1e-4)


def test_predict_separator_makes_any_argument_a_text(material, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cats").mkdir()  # a text that happens to name a folder in the working directory
    image = str(material / "colours" / "red" / "red_0.jpg")
    argv = ["--checkpoint", str(material / "model.pt"), "--json", image, "--", "cats", "a photo.jpg"]
    assert predict.main(argv) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(p["text"] for p in row["predictions"]) == ["a photo.jpg", "cats"]


def test_predict_takes_a_5000_character_caption_as_a_text(material, capsys):
    # Longer than a file name may be (255 bytes): stat fails with ENAMETOOLONG rather than "no such file".
    caption = ("a red square beside a blue circle " * 200)[:5_000]
    image = str(material / "colours" / "red" / "red_0.jpg")
    assert predict.main(["--checkpoint", str(material / "model.pt"), "--json", image, caption, "a cat"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(p["text"] for p in row["predictions"]) == sorted([caption, "a cat"])
    # Without an image, the error quotes the start of each argument, not the whole caption.
    err = _fails(predict.main, ["--checkpoint", str(material / "model.pt"), caption, "a cat"], capsys)
    quoted = f"['{caption[:60]}…', 'a cat']"
    assert err == f"error: no images given: none of {quoted} is an existing image file or folder\n"


def test_predict_bad_inputs(material, capsys):
    model = str(material / "model.pt")
    image = str(material / "colours" / "red" / "red_0.jpg")
    assert "no texts given" in _fails(predict.main, ["--checkpoint", model, image], capsys)
    assert "not found: missing.jpg" in _fails(
        predict.main, ["--checkpoint", model, "missing.jpg", "--", "a"], capsys
    )
    # Without `--`, a missing file with an image extension is a mistyped path, not a caption.
    err = _fails(predict.main, ["--checkpoint", model, image, "missing.png", "a cat"], capsys)
    assert "image not found: missing.png" in err and "--" in err
    err = _fails(predict.main, ["--checkpoint", model, "a cat", "a dog"], capsys)
    assert "no images given" in err
    out, err = _refused(predict.main, ["--checkpoint", "nowhere.ckpt", image, "a cat"], capsys)
    # The plan line goes to stderr too: argparse's refusal must be all there is.
    assert out == "" and _checkpoint_refused(err, "checkpoint not found: nowhere.ckpt"), err


def _build_index(material: Path, index: Path) -> None:
    pattern = str(material / "shards" / "shard-{000000..000001}.tar")
    argv = ["index", "--checkpoint", str(material / "model.pt"), "--shards", pattern, "--out", str(index)]
    assert search.main(argv) == 0


_SECTION = re.compile(r"<section><h2>(.*?)</h2>(.*?)</section>", re.S)
_CAPTION = re.compile(r"<figcaption>#(\d+) · (-?\d+\.\d+)<br>(.*?)</figcaption>", re.S)


def _page_results(page: str) -> dict[str, list[tuple[int, float, str]]]:
    """Query text → [(rank, score, image name)] as the HTML page lists them, in page order."""
    return {
        html.unescape(heading): [
            (int(rank), float(score), html.unescape(name)) for rank, score, name in _CAPTION.findall(body)
        ]
        for heading, body in _SECTION.findall(page)
    }


def test_search_index_then_query(material, tmp_path, capsys):
    index = tmp_path / "idx.pt"
    _build_index(material, index)
    assert capsys.readouterr().out.splitlines()[-1].startswith("indexed 6 images")
    out = tmp_path / "results"
    queries = ["a red circle", "blue"]
    assert search.main(["query", "--index", str(index), *queries, "--top-k", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "index.html" in printed[-1]
    assert " for 2 queries, top 4;" in printed[0]
    assert printed[-1].startswith("searched 6 images for 2 queries ")
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 8
    assert len(list((out / "images").glob("*.jpg"))) == 8
    assert sorted(p.name for p in out.glob("*.png")) == ["query00-a-red-circle.png", "query01-blue.png"]

    # Each query's results are its brute-force ranking of the whole index, best first: every image scored
    # with the model's own text and image features.
    embeds, refs, _ = search.read_index(index)
    assert len(refs) == len(COLOURS) * 2
    model = tiny_model(seed=11)
    # The index holds the model's image features (float16: within 1e-3).
    torch.testing.assert_close(embed_images(model, refs), embeds, atol=1e-3, rtol=0)
    scores = embed_texts(model, tokenizer_for(model), queries) @ embeds.T  # (2 queries, 6 images)
    rankings = scores.argsort(dim=1, descending=True)[:, :4].tolist()
    # The premise: the queries rank the images differently, so one query's results shown for both fail.
    assert rankings[0] != rankings[1]
    results = _page_results(page)
    assert list(results) == queries
    for q, query in enumerate(queries):
        assert [name for _, _, name in results[query]] == [refs[i].name for i in rankings[q]], query
        assert [rank for rank, _, _ in results[query]] == [1, 2, 3, 4]
        shown = torch.tensor([score for _, score, _ in results[query]])
        torch.testing.assert_close(shown, scores[q, rankings[q]], atol=5e-4, rtol=0)  # 3 decimals


def test_search_query_refusals(material, tmp_path, capsys):
    index = tmp_path / "idx.pt"
    _build_index(material, index)
    out = tmp_path / "results"
    err = _fails(
        search.main, ["query", "--index", str(index), "red", "--top-k", "0", "--out", str(out)], capsys
    )
    assert "error: --top-k must be >= 1, got 0" in err
    # A model of another architecture (same embedding width, so nothing else would stop it) did not build
    # the index: its text features are not comparable with the index's image features.
    other = save_model(tiny_model(seed=11, name="rn-tiny"), tmp_path / "other.pt")
    argv = ["query", "--index", str(index), "red", "--checkpoint", str(other), "--out", str(out)]
    err = _fails(search.main, argv, capsys)
    assert f"error: {other} is not the model that built {index}: their configs differ" in err
    assert not out.exists()


def test_search_query_refuses_other_weights_of_the_same_architecture(material, tmp_path, capsys):
    index = tmp_path / "idx.pt"
    _build_index(material, index)
    out = tmp_path / "results"
    retrained = save_model(tiny_model(seed=12), tmp_path / "retrained.pt")  # same config, other weights
    argv = ["query", "--index", str(index), "red", "--checkpoint", str(retrained), "--out", str(out)]
    capsys.readouterr()
    _, err = _refused(search.main, argv, capsys)
    assert err.startswith(
        f"error: {retrained} is not the model that built {index}: same architecture, but other weights"
    )
    assert "rebuild the index" in err and not out.exists()
    # The same weights in another file format are the same model: accepted.
    same = save_openai_checkpoint(tiny_model(seed=11), tmp_path / "same.safetensors")
    argv = ["query", "--index", str(index), "red", "--checkpoint", str(same), "--out", str(out)]
    assert search.main(argv) == 0
    captured = capsys.readouterr()
    assert " for 1 query, top 16;" in captured.out and "warning" not in captured.err


def test_search_index_without_a_fingerprint_loads_with_a_warning(material, tmp_path, capsys):
    index = tmp_path / "old.pt"
    _build_index(material, index)
    record = torch.load(index, weights_only=True)
    assert len(record.pop(search.FINGERPRINT_KEY)) == 64  # the premise: a SHA-256 was written
    torch.save(record, index)  # as an index written before the fingerprint was
    capsys.readouterr()
    out = tmp_path / "results"
    retrained = save_model(tiny_model(seed=12), tmp_path / "retrained.pt")
    for checkpoint in (material / "model.pt", retrained):  # neither can be checked
        argv = ["query", "--index", str(index), "red", "--checkpoint", str(checkpoint), "--out", str(out)]
        assert search.main(argv) == 0
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {index} has no fingerprint of the weights that built it"), err
        assert f"cannot be checked that {checkpoint} holds those weights" in err
    assert (out / "index.html").is_file()


def test_search_query_on_a_file_that_is_no_index(material, tmp_path, capsys):
    for path, kind in _not_checkpoints(tmp_path, material).values():
        argv = ["query", "--index", str(path), "cat", "--out", str(tmp_path / "o")]
        out, err = _refused(search.main, argv, capsys)
        assert (out, err) == (
            "",
            f"error: {path} is not a search index: it is {kind}; write one with "
            "`python -m clip_train.search index`\n",
        )


def test_search_bad_inputs(material, tmp_path, capsys):
    not_index = tmp_path / "x.pt"
    torch.save({"a": 1}, not_index)
    err = _fails(
        search.main, ["query", "--index", str(not_index), "cat", "--out", str(tmp_path / "o")], capsys
    )
    assert "x.pt is not a search index" in err
    err = _fails(
        search.main, ["query", "--index", str(tmp_path / "none.pt"), "cat", "--out", str(tmp_path)], capsys
    )
    assert f"search index not found: {tmp_path / 'none.pt'}" in err
    err = _fails(
        search.main,
        [
            "index",
            "--checkpoint",
            str(material / "model.pt"),
            "--images",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "i.pt"),
        ],
        capsys,
    )
    assert "nothing" in err


# --------------------------------------------------------------------------------- checkpoint folders


@pytest.fixture(scope="module")
def huggingface_export(material) -> tuple[Path, Path]:
    """(our model file, the same model exported as a Hugging Face CLIPModel folder)."""
    model = perturbed_model(seed=21)
    ours = save_model(model, material / "hf_source.pt")
    export_model(model, "huggingface", material / "hf")
    return ours, material / "hf"


def test_every_cli_reads_a_huggingface_folder(material, huggingface_export, tmp_path, capsys):
    ours, folder = huggingface_export
    image = str(material / "colours" / "red" / "red_0.jpg")
    texts = ["a red thing", "a blue thing", "two cats and remotes"]
    # predict, as a user runs it: a subprocess from the shell, on the folder.
    result = subprocess.run(
        [sys.executable, "-m", "clip_train.predict", "--checkpoint", str(folder), "--json", image, *texts],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    got = {p["text"]: p["probability"] for p in row["predictions"]}
    expected = caption_probabilities(load_model(ours), [ImageRef(image)], texts)[0]
    torch.testing.assert_close(torch.tensor([got[t] for t in texts]), expected, atol=1e-6, rtol=0)

    # eval on the folder and on its weights file: the report of the original model file.
    reports = {}
    for name, checkpoint in (("ours", ours), ("folder", folder), ("weights", folder / "model.safetensors")):
        argv = ["--checkpoint", str(checkpoint), "--imagefolder", str(material / "colours")]
        assert eval_cli.main([*argv, "--out", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())["zero_shot"]
    assert reports["folder"] == reports["weights"] == reports["ours"]

    # search: an index built from the folder accepts the original file as the same weights (bit for bit).
    index = tmp_path / "idx.pt"
    argv = ["index", "--checkpoint", str(folder), "--images", str(material / "colours"), "--out", str(index)]
    assert search.main(argv) == 0
    argv = ["query", "--index", str(index), "red", "--checkpoint", str(ours), "--out", str(tmp_path / "q")]
    assert search.main(argv) == 0
    assert "warning" not in capsys.readouterr().err

    # export: the folder converts to another format.
    argv = ["--checkpoint", str(folder), "--format", "openai", "--out", str(tmp_path / "openai")]
    assert export_cli.main(argv) == 0
    reloaded = load_model(tmp_path / "openai" / "open_clip_model.safetensors")
    assert all(
        torch.equal(a, b)
        for a, b in zip(reloaded.state_dict().values(), load_model(ours).state_dict().values())
    )


def test_a_folder_as_checkpoint_says_what_to_pass(material, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    shutil.copy(material / "model.pt", last)
    image, colours = str(material / "colours" / "red" / "red_0.jpg"), str(material / "colours")
    expected = (
        f"{run_dir} is a folder, not a checkpoint: pass one of its checkpoint files ({last}), or a Hugging "
        "Face CLIPModel folder (config.json + model.safetensors)"
    )
    runs = [
        (eval_cli.main, [], ["--imagefolder", colours, "--out", str(tmp_path / "o")]),
        (predict.main, [], [image, "a cat"]),
        (search.main, ["index"], ["--images", colours, "--out", str(tmp_path / "i.pt")]),
        (textness.main, ["train"], ["--images", colours]),
        (export_cli.main, [], ["--format", "onnx", "--out", str(tmp_path / "e")]),
    ]
    for main, before, after in runs:
        out, err = _refused(main, [*before, "--checkpoint", str(run_dir), *after], capsys)
        assert _checkpoint_refused(err, expected), (main.__module__, err)
        assert out == "", (main.__module__, out)
    assert not any((tmp_path / name).exists() for name in ("o", "i.pt", "e"))
