"""The eval, predict and search CLIs, run in-process on a tiny saved model, images written with PIL."""

from __future__ import annotations

import json
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

from clip_train import eval as eval_cli
from clip_train import predict, search
from clip_train.checkpoints import save_model
from clip_train.evaluation import evaluate_zero_shot, image_folder, load_templates
from clip_train.evaluation.cli_common import run
from clip_train.models.openai_layout import save_openai_checkpoint


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


@pytest.mark.parametrize("module", [eval_cli, predict, search])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


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


def test_predict_bad_inputs(material, capsys):
    model = str(material / "model.pt")
    image = str(material / "colours" / "red" / "red_0.jpg")
    assert "no texts given" in _fails(predict.main, ["--checkpoint", model, image], capsys)
    assert "not found: missing.jpg" in _fails(
        predict.main, ["--checkpoint", model, "missing.jpg", "--", "a"], capsys
    )


def test_search_index_then_query(material, tmp_path, capsys):
    index = tmp_path / "idx.pt"
    pattern = str(material / "shards" / "shard-{000000..000001}.tar")
    assert (
        search.main(
            ["index", "--checkpoint", str(material / "model.pt"), "--shards", pattern, "--out", str(index)]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1].startswith("indexed 6 images")
    out = tmp_path / "results"
    assert (
        search.main(
            ["query", "--index", str(index), "a red circle", "blue", "--top-k", "4", "--out", str(out)]
        )
        == 0
    )
    assert "index.html" in capsys.readouterr().out.splitlines()[-1]
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 8 and "a red circle" in page
    assert len(list((out / "images").glob("*.jpg"))) == 8
    assert sorted(p.name for p in out.glob("*.png")) == ["query00-a-red-circle.png", "query01-blue.png"]

    # The results are the brute-force top 4 of the index.
    embeds, refs, _ = search.read_index(index)
    model = tiny_model(seed=11)
    from clip_train.evaluation.embedding import embed_texts, tokenizer_for

    query = embed_texts(model, tokenizer_for(model), ["a red circle"])
    best = (query @ embeds.T).topk(4).indices[0].tolist()
    assert [f"{refs[i].name}" in page for i in best] == [True] * 4
    assert len(COLOURS) * 2 == len(refs)


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
