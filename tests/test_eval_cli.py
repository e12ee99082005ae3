"""The eval, predict and search CLIs, run in-process on a tiny saved model, images written with PIL."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from eval_support import (
    COLOURS,
    tiny_model,
    write_captioned_folder,
    write_colour_folder,
    write_labelled_shards,
)
from PIL import Image

from clip_train import eval as eval_cli
from clip_train import predict, search
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
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


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
    report = json.loads((out / "report.json").read_text())
    expected = evaluate_zero_shot(
        tiny_model(seed=11), image_folder(material / "colours"), load_templates("imagenet80")
    )
    assert report["zero_shot"]["top1"] == pytest.approx(expected.metrics.top1)
    assert report["zero_shot"]["confusion_matrix"] == expected.metrics.confusion.tolist()
    assert report["zero_shot"]["num_templates"] == 80
    assert set(report["retrieval"]) >= {"image_to_text_R@1", "text_to_image_R@10"}
    for png in ("confusion_matrix.png", "per_class_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "checkpoint not found: " in _fails(
        eval_cli.main, ["--checkpoint", "nowhere.ckpt", *base[2:]], capsys
    )
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
    assert "index.html" in capsys.readouterr().out.splitlines()[-1]
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
    assert "index file not found" in err
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
