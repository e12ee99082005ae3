"""The embedded demo (`make demo`): a captioned image website → the query-balanced crawler → WebDataset
shards → a small CLIP trained on the CPU → zero-shot evaluation on held-out images → a report.

    python scripts/demo/run_demo.py                 # the full demo into demo/ (about 10-15 min on 2 cores)
    python scripts/demo/run_demo.py --rows 2000 --out /tmp/demo --train trainer.max_steps=20   # a quick look

Stages (each timed; everything is written under --out):
1. source   procedural scenes served over HTTP on 127.0.0.1 (scripts/demo/serve.py): a table of
            URL + caption rows with a skewed query distribution, broken URLs and bad files among them;
            a held-out test set rendered separately (all 64 (shape, colour) pairs, 8 never crawled)
2. crawl    python -m data_pipelines.build_queries / .extract / .balance / .download → OUT/shards
3. train    python -m clip_train (the default config is this demo's recipe) → OUT/runs/demo
4. evaluate zero-shot shape and colour classification (prompt ensembles) on seen and unseen pairs
5. report   OUT/report/index.html and its PNGs; the figures and targets printed at the end
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenes
from serve import SceneServer, serving

REPO = Path(__file__).resolve().parents[2]

# Prompt ensembles. Each attribute's prompts name every value of the other attribute in turn (the class
# embedding is the mean over all of them), so a class is described the way the captions describe objects
# ("a red star") without favouring any one colour or shape: nothing about the test image is used.
_FRAMES = (
    "a photo of one {colour} {shape}.",
    "one {colour} {shape}.",
    "clip art: {colour} {shape}",
    "{colour} {shape} icon",
    "an illustration of one {colour} {shape}.",
)
_SHAPE_FRAMES = tuple(f.replace("{shape}", "{}") for f in _FRAMES)
_COLOUR_FRAMES = tuple(f.replace("{colour}", "{}") for f in _FRAMES)
SHAPE_TEMPLATES = tuple(f.replace("{colour}", c) for f in _SHAPE_FRAMES for c in scenes.COLOURS)
COLOUR_TEMPLATES = tuple(f.replace("{shape}", s) for f in _COLOUR_FRAMES for s in scenes.SHAPES)
# Targets of the issue: zero-shot accuracy on held-out images of seen pairs, and at most this many points
# lower on pairs never seen in training.
TARGETS = {"shape": 0.85, "colour": 0.95}
UNSEEN_MARGIN = 0.10


@dataclass
class DemoConfig:
    out: Path
    seed: int = 0
    rows: int = 40_000  # rows of the source table
    t: int = 150  # pairs per query at most (the balancing threshold)
    eval_per_seen_pair: int = 12  # held-out images of each pair that occurs in training
    eval_per_unseen_pair: int = 40  # held-out images of each pair that never does
    workers: int = 2
    # A fixed port makes the crawl repeatable: the balancing's selection is keyed on the URLs, which carry
    # the port, so each free port would pick a different ~16,600 of the 40,000 rows. 0: any free port.
    port: int = 8765
    train_overrides: list[str] = field(default_factory=list)


@dataclass
class StageLog:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        print(f"\n=== [{len(self.seconds) + 1}/5] {name}: {what}", flush=True)
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - start
        print(f"=== {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result


# ------------------------------------------------------------------------------------------ 1. source
def query_lists() -> list[str]:
    """The crawler's queries: every shape (singular and plural), colour, (colour, shape) pair and written
    word — the held-out pairs included, as the crawler cannot know what the evaluation will ask."""
    queries = [*scenes.SHAPES, *(scenes.plural(s) for s in scenes.SHAPES), *scenes.COLOURS]
    queries += [f"{c} {s}" for s in scenes.SHAPES for c in scenes.COLOURS]
    queries += [f"{c} {scenes.plural(s)}" for s in scenes.SHAPES for c in scenes.COLOURS]
    return queries + list(scenes.WORDS)


def malformed_rows(base_url: str) -> list[tuple[str, str]]:
    """Table rows the extractor must reject or drop: bad schemes, a data URI, empty fields, a duplicate
    URL and a caption that matches no query."""
    return [
        ("ftp://127.0.0.1/img/000000.jpg", "a red circle"),
        ("data:image/png;base64,iVBORw0KGgo=", "a blue square"),
        ("", "a green star"),
        (f"{base_url}/img/000001.jpg", ""),
        ("img/000002.jpg", "a yellow triangle"),
        (f"{base_url}/img/000003.jpg", "the same image posted again as a red heart"),
        (f"{base_url}/img/000004.jpg", "an abstract picture"),
    ]


def write_source_table(cfg: DemoConfig, base_url: str) -> dict[str, Any]:
    """OUT/source/captions.parquet (url, text) and the per-row truth OUT/source/rows.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = cfg.out / "source"
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(scenes.source_rows(cfg.seed, cfg.rows))
    extra = malformed_rows(base_url)
    urls = [base_url + r.path for r in rows] + [u for u, _ in extra]
    texts = [r.text for r in rows] + [t for _, t in extra]
    pq.write_table(pa.table({"url": urls, "text": texts}), folder / "captions.parquet")
    truth = pa.table(
        {
            "url": [base_url + r.path for r in rows],
            "shape": [r.scene.shape for r in rows],
            "colour": [r.scene.colour for r in rows],
            "fault": [r.fault or "" for r in rows],
        }
    )
    pq.write_table(truth, folder / "rows.parquet")
    (folder / "query_lists.txt").write_text("\n".join(query_lists()) + "\n")
    faults: dict[str, int] = {}
    for r in rows:
        if r.fault:
            faults[r.fault] = faults.get(r.fault, 0) + 1
    return {"rows": len(urls), "faults": faults, "malformed": len(extra)}


def render_eval_set(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Held-out test images (never served) → OUT/eval/images/*.jpg and OUT/eval/labels.json."""
    folder = cfg.out / "eval" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for shape in scenes.SHAPES:
        for colour in scenes.COLOURS:
            seen = (shape, colour) not in scenes.HELD_OUT
            for i in range(cfg.eval_per_seen_pair if seen else cfg.eval_per_unseen_pair):
                scene = scenes.eval_scene(cfg.seed, i, (shape, colour))
                path = folder / f"{shape}-{colour}-{i:03d}.jpg"
                path.write_bytes(scenes.encode(scenes.render(scene), "jpg"))
                labels.append({"file": str(path), "shape": shape, "colour": colour, "seen": seen})
    (cfg.out / "eval" / "labels.json").write_text(json.dumps(labels, indent=1))
    return labels


# ------------------------------------------------------------------------------------------- 2. crawl
def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None) -> None:
    """Run `python -m ...` from the repository root with output passed through; stop the demo on failure."""
    command = [sys.executable, *args]
    print("$ " + " ".join(str(a) for a in args[1:3]) + " …", flush=True)
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:2])} failed with exit status {proc.returncode}")


def crawl(cfg: DemoConfig) -> dict[str, Any]:
    src, work = cfg.out / "source", cfg.out / "work"
    queries = src / "queries.txt"
    workers = str(cfg.workers)
    run_cli(
        ["-m", "data_pipelines.build_queries", "--lists", str(src / "query_lists.txt"), "--out", str(queries)]
    )
    run_cli(
        ["-m", "data_pipelines.extract", "--queries", str(queries), "--tables", str(src / "captions.parquet"),
         "--work", str(work), "--buckets", "4", "--workers", workers]
    )  # fmt: skip
    run_cli(
        ["-m", "data_pipelines.balance", "--work", str(work), "--out", str(cfg.out / "candidates"),
         "--t", str(cfg.t), "--seed", str(cfg.seed), "--workers", workers]
    )  # fmt: skip
    run_cli(
        ["-m", "data_pipelines.download", str(cfg.out / "candidates"), str(cfg.out / "shards"),
         "--allow-private-addresses", "--image-size", "64", "--samples-per-shard", "1000",
         "--rows-per-part", "1000", "--processes", workers, "--threads", "2", "--concurrency", "32",
         "--retries", "1", "--backoff", "0.05", "--connect-timeout", "2", "--read-timeout", "5",
         "--total-timeout", "10"]
    )  # fmt: skip
    stats = json.loads((cfg.out / "candidates" / "stats.json").read_text())
    manifest = json.loads((cfg.out / "shards" / "manifest.json").read_text())
    return {"candidates": stats, "manifest": manifest}


# ------------------------------------------------------------------------------------------- 3. train
def train(cfg: DemoConfig) -> Path:
    run_dir = cfg.out / "runs" / "demo"
    if run_dir.exists():  # a fresh run every time: no resuming a previous demo's checkpoint
        shutil.rmtree(run_dir)
    overrides = [
        f"data.train_shards={cfg.out / 'shards'}",
        f"paths.runs_dir={cfg.out / 'runs'}",
        "run_name=demo",
    ]
    overrides += cfg.train_overrides
    # Lightning's step-triggered checkpoints do not save the final step, so checkpoint once per epoch: the
    # last one is then the trained model.
    overrides.append(f"callbacks.checkpoint.every_n_train_steps={steps_per_epoch(cfg, overrides)}")
    run_cli(["-m", "clip_train", *overrides])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise SystemExit(f"error: training wrote no checkpoint at {checkpoint}")
    return run_dir


def steps_per_epoch(cfg: DemoConfig, overrides: list[str]) -> int:
    """Optimiser steps per epoch of the training run: shard samples // the config's global batch size."""
    from hydra import compose, initialize_config_dir

    from clip_train.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        batch = int(compose("train", overrides=overrides).global_batch_size)
    samples = json.loads((cfg.out / "shards" / "manifest.json").read_text())["num_samples"]
    if samples < batch:
        raise SystemExit(f"error: {samples} training samples, fewer than one batch of {batch}")
    return samples // batch


# ---------------------------------------------------------------------------------------- 4. evaluate
@dataclass
class AttributeResult:
    attribute: str  # "shape" or "colour"
    classnames: list[str]
    predictions: list[int]
    labels: list[int]
    probabilities: list[list[float]]
    seen: list[bool]
    accuracy: dict[str, float]  # "seen", "unseen", "all"
    confusion: dict[str, list[list[int]]]  # "seen", "unseen"


def evaluate(cfg: DemoConfig, run_dir: Path, labels: list[dict[str, Any]]) -> dict[str, AttributeResult]:
    import torch

    from clip_train.checkpoints import load_model
    from clip_train.evaluation import ClassificationSet, ImageRef, classification_metrics, evaluate_zero_shot

    torch.set_num_threads(cfg.workers)
    model = load_model(run_dir / "checkpoints" / "last.ckpt").eval()
    images = [ImageRef(row["file"]) for row in labels]
    seen = torch.tensor([row["seen"] for row in labels])
    results = {}
    for attribute, classnames, templates in (
        ("shape", list(scenes.SHAPES), SHAPE_TEMPLATES),
        ("colour", list(scenes.COLOURS), COLOUR_TEMPLATES),
    ):
        truth = torch.tensor([classnames.index(row[attribute]) for row in labels])
        dataset = ClassificationSet(f"held-out {attribute}", images, truth, classnames)
        result = evaluate_zero_shot(model, dataset, list(templates), batch_size=128, progress=True)
        accuracy, confusion = {"all": result.metrics.top1}, {}
        for part, mask in (("seen", seen), ("unseen", ~seen)):
            logits = result.probabilities[mask].log()
            metrics = classification_metrics(logits, truth[mask])
            accuracy[part] = metrics.top1
            confusion[part] = metrics.confusion.tolist()
        results[attribute] = AttributeResult(
            attribute,
            classnames,
            result.predictions.tolist(),
            truth.tolist(),
            result.probabilities.tolist(),
            seen.tolist(),
            accuracy,
            confusion,
        )
    return results


def target_checks(results: dict[str, AttributeResult]) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, met) for each target of the issue."""
    checks = []
    for attribute, target in TARGETS.items():
        acc = results[attribute].accuracy
        checks.append((f"{attribute}, seen pairs", acc["seen"], f">= {target:.0%}", acc["seen"] >= target))
        floor = target - UNSEEN_MARGIN
        ok = acc["unseen"] >= floor and acc["unseen"] >= acc["seen"] - UNSEEN_MARGIN
        checks.append(
            (f"{attribute}, unseen pairs", acc["unseen"], f">= {floor:.0%} and within 10 pts of seen", ok)
        )
    return checks


# -------------------------------------------------------------------------------------------- driver
def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def parse_args(argv: list[str] | None) -> tuple[DemoConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "demo", help="output folder (default: ./demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=DemoConfig.rows, help="rows of the source table")
    p.add_argument("--t", type=int, default=DemoConfig.t, help="balancing threshold: pairs per query at most")
    p.add_argument("--eval-per-seen-pair", type=int, default=DemoConfig.eval_per_seen_pair)
    p.add_argument("--eval-per-unseen-pair", type=int, default=DemoConfig.eval_per_unseen_pair)
    p.add_argument("--workers", type=int, default=DemoConfig.workers, help="processes per stage (default: 2)")
    p.add_argument(
        "--port",
        type=int,
        default=DemoConfig.port,
        help="port of the scene website on 127.0.0.1 (default: %(default)s; 0: any free port). The crawl's "
        "selection depends on it (URLs carry the port); a busy port falls back to a free one, with a note",
    )
    p.add_argument(
        "--train",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for python -m clip_train, e.g. trainer.max_steps=20",
    )
    p.add_argument("--keep", action="store_true", help="do not delete a previous demo in --out first")
    args = p.parse_args(argv)
    if args.rows < 1 or args.t < 1:
        p.error("--rows and --t must be positive")
    cfg = DemoConfig(
        out=args.out.resolve(),
        seed=args.seed,
        rows=args.rows,
        t=args.t,
        eval_per_seen_pair=args.eval_per_seen_pair,
        eval_per_unseen_pair=args.eval_per_unseen_pair,
        workers=args.workers,
        port=args.port,
        train_overrides=list(args.train),
    )
    return cfg, args.keep


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, keep = parse_args(argv)
    from report import print_summary, write_report

    if cfg.out.exists() and not keep:
        for name in ("source", "work", "candidates", "shards", "runs", "eval", "report"):
            shutil.rmtree(cfg.out / name, ignore_errors=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(
        f"clip_train demo → {cfg.out}: {cfg.rows} source rows, t={cfg.t} pairs per query, "
        f"{len(scenes.SHAPES)} shapes × {len(scenes.COLOURS)} colours, {len(scenes.HELD_OUT)} pairs held out",
        flush=True,
    )
    log = StageLog()
    total_start = time.perf_counter()
    port = cfg.port
    if port and not _port_is_free(port):
        print(
            f"note: port {port} is busy, so the scene website uses a free port; the balancing is keyed on "
            f"URLs, which carry the port, so this crawl selects other rows than a run on port {port}",
            flush=True,
        )
        port = 0
    with serving(cfg.seed, cfg.rows, port) as server:
        source = log.run(
            "source",
            f"scene website at {server.base_url}, URL/caption table, held-out test images",
            lambda: _source(cfg, server),
        )
        crawled = log.run("crawl", "build_queries → extract → balance → download", lambda: crawl(cfg))
        crawled["requests_served"] = server.requests_served
    run_dir = log.run("train", "python -m clip_train (the default demo recipe)", lambda: train(cfg))
    results = log.run(
        "evaluate",
        "zero-shot shape and colour on held-out images",
        lambda: evaluate(cfg, run_dir, source["labels"]),
    )
    report = log.run(
        "report",
        "training curves, balancing, confusion matrices, examples",
        lambda: write_report(cfg.out, run_dir, source, crawled, results, target_checks(results), log.seconds),
    )
    total = time.perf_counter() - total_start
    print_summary(results, target_checks(results), log.seconds, total, report)
    return {"results": results, "seconds": log.seconds, "total": total, "report": report}


def _source(cfg: DemoConfig, server: SceneServer) -> dict[str, Any]:
    table = write_source_table(cfg, server.base_url)
    labels = render_eval_set(cfg)
    print(
        f"source: {table['rows']} rows ({sum(table['faults'].values())} broken on the server, "
        f"{table['malformed']} malformed); {len(labels)} held-out test images",
        flush=True,
    )
    return {**table, "labels": labels, "base_url": server.base_url}


if __name__ == "__main__":
    main()
