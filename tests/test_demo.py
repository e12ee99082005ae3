"""The embedded demo (scripts/demo/): its scene generator, its HTTP server on 127.0.0.1, and a miniature run
of every stage (real crawler CLIPs, real training, real evaluation and report) on a few dozen images."""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

DEMO_DIR = Path(__file__).resolve().parents[1] / "scripts" / "demo"
sys.path.insert(0, str(DEMO_DIR))

import run_demo  # noqa: E402
import scenes  # noqa: E402
from serve import serving  # noqa: E402


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


# ---------------------------------------------------------------------------------------------- scenes
def test_the_source_is_deterministic_and_seeds_differ():
    first = [scenes.source_row(0, i) for i in range(50)]
    again = [scenes.source_row(0, i) for i in range(50)]
    assert first == again
    assert scenes.encode(scenes.render(first[7].scene), "png") == scenes.encode(
        scenes.render(again[7].scene), "png"
    )
    other = [scenes.source_row(1, i) for i in range(50)]
    assert [r.text for r in other] != [r.text for r in first]


def test_the_source_is_skewed_fifty_to_one_and_never_shows_held_out_pairs():
    weights = scenes.combo_weights(include_held_out=True)
    assert max(weights.values()) / min(weights.values()) == pytest.approx(scenes.SKEW)
    # One held-out pair per shape and per colour, so every shape and colour is still seen in training.
    assert sorted(s for s, _ in scenes.HELD_OUT) == sorted(scenes.SHAPES)
    assert sorted(c for _, c in scenes.HELD_OUT) == sorted(scenes.COLOURS)
    counts = Counter(scenes.source_row(0, i).scene.combo for i in range(4000))
    assert not set(counts) & scenes.HELD_OUT
    head, tail = max(weights, key=weights.get), min(scenes.combo_weights(), key=weights.get)
    assert counts[head] > 10 * max(counts[tail], 1)


def test_captions_name_only_the_scenes_own_shape_and_colour():
    words = {*scenes.SHAPES, *map(scenes.plural, scenes.SHAPES), *scenes.COLOURS}
    frames: Counter = Counter()
    for i in range(600):
        row = scenes.source_row(0, i)
        named = set(re.findall(r"[a-z]+", row.text.lower())) & words
        assert named <= {row.scene.shape, scenes.plural(row.scene.shape), row.scene.colour}, row.text
        frames[
            (bool(named & {row.scene.shape, scenes.plural(row.scene.shape)}), row.scene.colour in named)
        ] += 1
    # Most captions name both, some only the shape, some only the colour.
    assert frames[(True, True)] > 300 and frames[(True, False)] > 40 and frames[(False, True)] > 20
    assert any(scenes.source_row(0, i).scene.word for i in range(50))


# ---------------------------------------------------------------------------------------------- server
def test_the_server_serves_the_rendered_scenes_and_the_faults_on_loopback():
    rows = [scenes.source_row(0, i) for i in range(400)]
    good = next(r for r in rows if r.fault is None and r.path.endswith(".png"))
    by_fault = {r.fault: r for r in rows if r.fault}
    with serving(seed=0, rows=400) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        status, mime, body = _get(server.base_url + good.path)
        assert (status, mime) == (200, "image/png")
        assert Image.open(io.BytesIO(body)).convert("RGB").tobytes() == scenes.render(good.scene).tobytes()
        assert _get(server.base_url + "/robots.txt")[2] == b"User-agent: *\nDisallow: /private/\n"
        assert _get(server.base_url + by_fault["missing"].path)[0] == 404
        assert _get(server.base_url + good.path.replace(".png", ".jpg"))[0] == 404  # wrong extension
        assert _get(server.base_url + "/img/999999.jpg")[0] == 404  # beyond the source
        status, mime, body = _get(server.base_url + by_fault["truncated"].path)
        assert status == 200 and mime == "image/jpeg"
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()


# ------------------------------------------------------------------------------------------ end to end
def _listening_socket() -> socket.socket:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy


def test_the_scene_website_takes_the_port_it_is_given_and_a_busy_one_is_detected():
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        assert not run_demo._port_is_free(port)
    assert run_demo._port_is_free(port)
    with serving(0, 10, port) as server:  # the demo's fixed port: the same URLs, so the same crawl
        assert server.base_url == f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_a_miniature_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    busy = _listening_socket()  # the demo's port is taken: it must fall back to a free one and say so
    result = run_demo.main(
        ["--out", str(out), "--port", str(busy.getsockname()[1]),
         "--rows", "90", "--t", "6", "--eval-per-seen-pair", "1",
         "--eval-per-unseen-pair", "2", "--train", "global_batch_size=8", "trainer.max_epochs=1",
         "data.num_workers=1", "~callbacks.progress",
         "scheduler.warmup_steps=2", "trainer.log_every_n_steps=1", "logger.0.flush_logs_every_n_steps=1"]
    )  # fmt: skip
    busy.close()
    printed = capsys.readouterr().out
    assert "is busy, so the scene website uses a free port" in printed
    assert set(result["seconds"]) == {"source", "crawl", "train", "evaluate", "report"}
    for attribute in ("shape", "colour"):
        accuracy = result["results"][attribute].accuracy
        assert set(accuracy) == {"seen", "unseen", "all"} and all(0 <= v <= 1 for v in accuracy.values())
    # The crawler really crawled: balancing dropped rows, the server's faults became failed downloads.
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["balancing"]["dropped_by_balancing"] > 0
    failures = {k for k, v in summary["download_status_counts"].items() if k != "success" and v}
    assert failures and summary["num_train_samples"] > 8
    page = (out / "report" / "index.html").read_text()
    for png in ("training_curves.png", "pair_counts.png", "confusion_shape_unseen.png", "examples.png"):
        assert (out / "report" / png).stat().st_size > 1000 and png in page
    assert "report: " + str(out / "report" / "index.html") in printed and "shape, seen pairs" in printed
