"""`python -m clip_train.curves`: runs found, labelled by what their sweep varied, plotted, summarised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_train.curves import load_runs, main, smooth


def _run(path: Path, losses: list[float], lr: str, val: dict[int, float] | None = None) -> Path:
    """A run directory as `python -m clip_train` leaves it: logs/metrics.csv (Lightning's CSV layout, one
    row per logging call, empty cells for metrics not logged then) and the job's .hydra/overrides.yaml."""
    (path / "logs").mkdir(parents=True)
    rows = ["epoch,step,train/loss,train/lr,val/loss"]
    rows += [f"0,{step},{loss},{lr}," for step, loss in enumerate(losses)]
    rows += [f"0,{step},,,{v}" for step, v in (val or {}).items()]
    (path / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text(
        f"- +experiment=cpu_tiny\n- optimizer.lr={lr}\n- seed=0\n"
    )
    return path


def test_a_sweep_is_plotted_with_its_swept_values_and_summarised(tmp_path, capsys):
    sweep = tmp_path / "runs" / "tiny-sweep"
    _run(sweep / "0", [3.0, 2.0, 1.0, 0.5], "0.001", val={2: 1.5, 4: 0.9})
    _run(sweep / "10", [3.0, 2.5, 2.25, 2.0], "0.0001")  # job 10 after job 2, not after job 1
    _run(sweep / "2", [3.0, 2.9, 2.8, 2.7], "0.01")
    (sweep / "multirun.yaml").write_text("{}\n")  # a sweep folder holds other files too
    out = tmp_path / "curves.png"
    assert main([str(sweep), "--smooth", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| optimizer.lr=")]
    assert rows == [
        "| optimizer.lr=0.001 | 3 | 0.7500 | 0.9000 (4) |",
        "| optimizer.lr=0.01 | 3 | 2.7500 | — |",
        "| optimizer.lr=0.0001 | 3 | 2.1250 | — |",
    ]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300


def test_runs_without_a_sweep_are_named_by_their_folders_and_the_default_output_is_beside_them(tmp_path):
    a, b = (_run(tmp_path / name, [2.0, 1.0], "0.001") for name in ("a", "b"))
    assert [r.label for r in load_runs([a, b])] == ["a", "b"]  # same overrides: nothing tells them apart
    assert main([str(a), str(b)]) == 0
    assert (a / "curves.png").is_file()


def test_trailing_mean_never_looks_ahead():
    values = np.array([4.0, 2.0, 6.0, 0.0])
    assert smooth(values, 2).tolist() == [4.0, 3.0, 4.0, 3.0]
    assert smooth(values, 1).tolist() == values.tolist()
    assert smooth(values, 10).tolist() == [4.0, 3.0, 4.0, 3.0]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda p: p.mkdir(), [], "no logs/metrics.csv in it or in the folders directly inside it"),
        (lambda p: _run(p, [], "0.1"), [], "holds no train/loss yet"),
        (lambda p: _run(p, [1.0], "0.1"), ["--smooth", "0"], "--smooth must be at least 1"),
    ],
)
def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys, setup, args, message):
    setup(tmp_path / "run")
    assert main([str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "curves.png").exists()
