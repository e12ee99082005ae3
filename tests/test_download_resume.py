"""Resume after kill -9, retry of failed rows, and scale-out (processes, submitit arrays) give the same
shards as one uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_support import TEST_USER_AGENT, FaultServer

from data_pipelines.download.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def common_args(table: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(table),
        str(out),
        "--allow-private-addresses",
        "--user-agent",
        TEST_USER_AGENT,
        "--samples-per-shard",
        "10",
        "--image-size",
        "24",
        "--no-progress",
        "--retries",
        "0",
        "--read-timeout",
        "2",
        "--total-timeout",
        "4",
        *extra,
    ]


def write_urls(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "text": [f"caption {i}" for i in range(len(urls))]}), path)
    return path


def shard_contents(out: Path) -> dict[str, object]:
    """Everything that must match between runs: tar bytes, per-row statuses (attempts aside), manifest."""
    contents: dict[str, object] = {}
    for tar in sorted(out.glob("shard-*.tar")):
        contents[tar.name] = tar.read_bytes()
        rows = pq.read_table(tar.with_suffix(".parquet")).drop(["attempts"]).to_pylist()
        contents[tar.with_suffix(".parquet").name] = rows
    manifest = json.loads((out / "manifest.json").read_text())
    contents["manifest"] = {k: manifest[k] for k in ("shards", "num_samples", "status_counts")}
    return contents


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture(scope="module")
def slow_table(server: FaultServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """60 slow URLs (a few failing) and the output of one uninterrupted run over them."""
    tmp = tmp_path_factory.mktemp("slow")
    urls = [
        server.url(f"/slowimg/{i}.jpg") if i % 7 else server.url(f"/status/{404 + i % 2}") for i in range(60)
    ]
    table = write_urls(tmp / "in.parquet", urls)
    reference = tmp / "reference"
    assert cli_main(common_args(table, reference, "--concurrency", "8")) == 0
    return table, reference


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(
    server: FaultServer, slow_table, tmp_path: Path
) -> None:
    table, reference = slow_table
    out = tmp_path / "out"
    server.httpd.delay_seconds = 0.15
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "data_pipelines.download",
                *common_args(table, out, "--concurrency", "3", "--shards-in-flight", "1"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (out / "shard-000001.stats.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the download ended before the kill"
            time.sleep(0.02)
        time.sleep(0.2)  # well inside shard 2
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        server.httpd.delay_seconds = 0.05
    # Killed mid-run: some shards missing, none truncated under its final name, no manifest yet.
    finished = sorted(p.name for p in out.glob("shard-*.stats.json"))
    assert 2 <= len(finished) < 6 and not (out / "manifest.json").exists()
    for tar in out.glob("shard-*.tar"):
        with tarfile.open(tar) as f:
            names = f.getnames()
        rows = pq.read_table(tar.with_suffix(".parquet")).column("status").to_pylist()
        assert len(names) == 3 * rows.count("success")
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    assert shard_contents(out) == shard_contents(reference)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stale_partial_state_is_redone(slow_table, tmp_path: Path) -> None:
    """What a kill can leave: a tmp file, a final tar whose stats were never written, a torn stats file."""
    table, reference = slow_table
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    (out / "shard-000002.stats.json").unlink()
    (out / ".shard-000003.tar.999.tmp").write_bytes(b"partial")
    (out / "shard-000004.stats.json").write_text('{"tar_bytes": 1')
    (out / "manifest.json").unlink()
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    assert shard_contents(out) == shard_contents(reference)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before  # finished shards untouched


def test_retry_failed_refetches_only_failed_rows(tmp_path: Path) -> None:
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(8)]
        urls[2], urls[5] = server.url("/flaky/100.jpg"), server.url("/flaky/101.jpg")
        urls.append(server.url("/status/404"))
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        assert cli_main(common_args(table, out)) == 0
        assert json.loads((out / "manifest.json").read_text())["num_samples"] == 6
        server.httpd.flaky_ok = True
        hits = dict(server.hits)
        assert cli_main(common_args(table, out, "--retry-failed")) == 0
        assert server.hits["/img/0.jpg"] == hits["/img/0.jpg"]  # successes are not fetched again
        assert server.hits["/flaky/100.jpg"] == hits["/flaky/100.jpg"] + 1
        assert server.hits["/status/404"] == hits["/status/404"] + 1
        fresh = tmp_path / "fresh"
        assert cli_main(common_args(table, fresh)) == 0
        assert shard_contents(out) == shard_contents(fresh)
        assert json.loads((out / "manifest.json").read_text())["num_samples"] == 8
        # --retry-statuses narrows it: nothing is a timeout here, so nothing is fetched.
        hits = dict(server.hits)
        assert cli_main(common_args(table, out, "--retry-statuses", "timeout")) == 0
        assert dict(server.hits) == hits


@pytest.mark.slow
def test_local_processes_and_submitit_array_match(slow_table, tmp_path: Path) -> None:
    table, reference = slow_table
    two = tmp_path / "two-processes"
    assert cli_main(common_args(table, two, "--processes", "2", "--concurrency", "8")) == 0
    assert shard_contents(two) == shard_contents(reference)
    array = tmp_path / "array"
    args = common_args(table, array, "--submitit-local", "--slurm-array-size", "3", "--concurrency", "8")
    assert cli_main(args) == 0
    assert shard_contents(array) == shard_contents(reference)
    assert (array / "_submitit").is_dir()
