"""scripts/demo/run_extras.py (issue 7 shown on the demo) end to end on a miniature demo: every stage runs
through the real CLIs and leaves a well-formed report. The claims' thresholds are not checked: a demo of a
few dozen images trained for a few steps cannot reach them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

DEMO_DIR = Path(__file__).resolve().parents[1] / "scripts" / "demo"
sys.path.insert(0, str(DEMO_DIR))

import run_demo  # noqa: E402
import run_extras  # noqa: E402

# One thread and no loader processes: on a small shared CPU, tiny tensors run several times faster that way.
TINY_TRAINING = ["global_batch_size=16", "trainer.max_epochs=1", "data.num_workers=0", "~callbacks.progress",
                 "scheduler.warmup_steps=1", "trainer.log_every_n_steps=1"]  # fmt: skip


@pytest.mark.slow
def test_the_extras_run_on_a_miniature_demo_and_write_a_well_formed_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the training subprocesses too
    out = tmp_path / "demo"
    run_demo.main(
        ["--out", str(out), "--rows", "90", "--t", "6", "--eval-per-seen-pair", "1", "--eval-per-unseen-pair",
         "1", "--workers", "1", "--train", *TINY_TRAINING, "logger.0.flush_logs_every_n_steps=1"]
    )  # fmt: skip
    capsys.readouterr()
    queries = ["star", "ring"]
    result = run_extras.main(
        ["--demo", str(out), "--probe-per-pair", "1", "--pool-per-pair", "2", "--max-images", "16",
         "--queries", ",".join(queries), "--workers", "1", "--train", *TINY_TRAINING]
    )  # fmt: skip
    printed = capsys.readouterr().out

    assert list(result["seconds"]) == ["side files", "distil", "compare", "textness", "report"]
    assert sorted(p.name for p in out.joinpath("shards").glob("*.teacher.npz"))  # side files beside shards
    report = json.loads((out / "report" / "extras.json").read_text())
    distillation, textness = report["distillation"], report["textness"]
    assert Path(distillation["student"]).is_file()
    # The default student: half the width of the teacher's image tower, at most 30% of its parameters.
    assert 0 < distillation["image_params"]["ratio"] <= run_extras.PARAM_RATIO_TARGET
    mb = distillation["student_image_mb"]
    assert math.isclose(mb["fp16"] * 2, mb["fp32"]) and mb["fp32"] > 0
    assert distillation["speedup"] > 0 and distillation["agreement"]["text_to_image"]["queries"] == 16
    for attribute in ("shape", "colour"):
        z = distillation["zero_shot"][attribute]
        assert 0 <= z["teacher"] <= 1 and 0 <= z["student"] <= 1
    assert isinstance(distillation["claim"]["met"], bool) and isinstance(textness["claim"]["met"], bool)

    assert textness["scales"] == [-2.0, -1.0, 0.0, 1.0, 2.0] and textness["queries"] == queries
    assert len(textness["share"]) == 5 and all(len(row) == len(queries) for row in textness["share"])
    assert all(0 <= s <= 1 for row in textness["share"] for s in row)
    # Half the searched scenes carry a written word, and they are the text-bearing ones counted.
    assert textness["pool_with_words"] * 2 == textness["pool_images"] == 2 * 64
    pool = json.loads((out / "extras" / "textness" / "pool" / "scenes.json").read_text())
    assert sum(r["word"] is not None for r in pool) == textness["pool_with_words"]
    assert Path(textness["direction"]).is_file()
    for query, figure in zip(queries, textness["figures"], strict=True):
        assert Path(figure) == out / "report" / "extras" / f"textness_{query}.png"
        with Image.open(figure) as image:  # one row per scale, ten thumbnails per row: wide and tall
            assert image.format == "PNG" and image.width > 600 and image.height > 300

    assert "(a) PASS" in printed or "(a) MISSED" in printed
    assert "(b) PASS" in printed or "(b) MISSED" in printed
    assert str(out / "report" / "extras.json") in printed.splitlines()[-1]


def test_a_folder_that_is_not_a_finished_demo_is_refused_naming_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="not a finished demo folder: missing the crawled shards"):
        run_extras.main(["--demo", str(tmp_path)])


def test_the_distillation_report_reads_a_labels_file_like_the_demos(tmp_path):
    from clip_train.evaluation import DatasetError, labels_file_set

    records = [{"file": "a.jpg", "shape": "star", "colour": "red"}, {"file": "/abs/b.jpg", "shape": "ring"}]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(records))
    shapes = labels_file_set(path, "shape")
    assert shapes.classnames == ["ring", "star"] and shapes.labels.tolist() == [1, 0]
    # Relative files are found beside the labels file wherever the command runs; absolute ones stay.
    assert [ref.path for ref in shapes.images] == [str(tmp_path / "a.jpg"), "/abs/b.jpg"]
    with pytest.raises(DatasetError, match=r"records \[1\] lack 'file' or 'colour'"):
        labels_file_set(path, "colour")
