"""Resume after kill -9 (while downloading parts or while packing), retry of failed rows, repacking, and
scale-out (processes, submitit arrays) give the same final shards as one uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from download_support import TEST_USER_AGENT, FaultServer, run_download_cli

from data_pipelines.download import runner
from data_pipelines.download.__main__ import build_parser
from data_pipelines.download.__main__ import main as cli_main
from data_pipelines.download.pack import delete_parts, pack
from data_pipelines.download.plan import Plan
from data_pipelines.download.runner import _CHECKS, FAILURE_STATUSES, DownloadConfig, content_settings
from data_pipelines.download.shard_writer import read_samples, write_part

REPO = Path(__file__).resolve().parents[1]


def common_args(table: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(table),
        str(out),
        "--allow-private-addresses",
        "--user-agent",
        TEST_USER_AGENT,
        "--samples-per-shard",
        "8",
        "--rows-per-part",
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
    """Everything that must match between runs: the final shards' file names, tar bytes, per-row statuses
    (attempts aside), stats (no timings in them) and the manifest."""
    contents: dict[str, object] = {"names": sorted(p.name for p in out.glob("shard-*"))}
    for tar in sorted(out.glob("shard-*.tar")):
        contents[tar.name] = tar.read_bytes()
        rows = pq.read_table(tar.with_suffix(".parquet")).drop(["attempts"]).to_pylist()
        contents[tar.with_suffix(".parquet").name] = rows
        stats = tar.with_name(tar.name.replace(".tar", ".stats.json"))
        contents[stats.name] = json.loads(stats.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    keys = ("shards", "num_samples", "status_counts", "duplicates", "samples_per_shard")
    contents["manifest"] = {k: manifest[k] for k in keys}
    return contents


def hidden_files(out: Path) -> list[str]:
    return [p.name for folder in (out, out / "_parts") for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture(scope="module")
def slow_table(server: FaultServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """60 slow URLs (9 failing, 2 repeating the image of a row in an earlier part) and the output of one
    uninterrupted run over them: 6 parts of 10 rows, 49 samples in final shards of 8."""
    tmp = tmp_path_factory.mktemp("slow")
    urls = [
        server.url(f"/slowimg/{i}.jpg") if i % 7 else server.url(f"/status/{404 + i % 2}") for i in range(60)
    ]
    # The bytes of /slowimg/3.jpg and /slowimg/8.jpg, in part 0:
    urls[45], urls[52] = server.url("/dup/3.jpg"), server.url("/dup/8.jpg")
    table = write_urls(tmp / "in.parquet", urls)
    reference = tmp / "reference"
    assert cli_main(common_args(table, reference, "--concurrency", "8")) == 0
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [8] * 6 + [1]
    assert manifest["duplicates"] == 2
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
                *common_args(table, out, "--concurrency", "3", "--parts-in-flight", "1"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (out / "_parts" / "part-000001.stats.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the download ended before the kill"
            time.sleep(0.02)
        time.sleep(0.2)  # well inside part 2
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        server.httpd.delay_seconds = 0.05
    # Killed while downloading: some parts missing, none truncated under its final name, nothing packed.
    finished = sorted(p.name for p in (out / "_parts").glob("part-*.stats.json"))
    assert 2 <= len(finished) < 6 and not (out / "manifest.json").exists()
    assert not list(out.glob("shard-*"))
    for tar in (out / "_parts").glob("part-*.tar"):
        with tarfile.open(tar) as f:  # a final name never holds a truncated tar
            names = f.getnames()
        parquet = tar.with_suffix(".parquet")
        if parquet.exists():  # the kill may land between the tar's rename and the parquet's
            rows = pq.read_table(parquet).column("status").to_pylist()
            assert len(names) == 3 * rows.count("success")
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    assert shard_contents(out) == shard_contents(reference)
    assert not hidden_files(out)


def test_stale_partial_parts_are_redone(slow_table, tmp_path: Path) -> None:
    """What a kill while downloading can leave: a part with a tmp file and no stats, a torn stats file,
    temporaries of the plan and of packed.json."""
    table, reference = slow_table
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    parts = out / "_parts"
    (parts / "part-000002.stats.json").unlink()
    (parts / ".part-000002.parquet.999.tmp").write_bytes(b"partial")
    (parts / "part-000004.stats.json").write_text('{"tar_bytes": 1')
    # Temporaries of a launcher killed while writing the plan or packed.json, and a file of the user's.
    for name in ("_plan/.rows.999.tmp", "_plan/.plan.999.tmp", "_parts/.packed.json.999.tmp"):
        (out / name).write_bytes(b"partial")
    (out / "_plan" / ".notes.tmp").write_text("not ours")
    before = (parts / "part-000000.tar").stat().st_mtime_ns
    assert cli_main(common_args(table, out, "--concurrency", "8")) == 0
    assert shard_contents(out) == shard_contents(reference)
    assert (parts / "part-000000.tar").stat().st_mtime_ns == before  # finished parts untouched
    assert not hidden_files(out)
    assert [p.name for p in (out / "_plan").iterdir() if p.name.startswith(".")] == [".notes.tmp"]


def test_an_interrupted_pack_is_redone_without_downloading(
    server: FaultServer, slow_table, tmp_path: Path
) -> None:
    """What a kill during the pack can leave: no manifest or packed.json (removed before the first final
    file changes), a shard whose stats were never written, a tmp file, a tar of an earlier pack whose
    stats no longer match, and shards beyond the count (an earlier pack with more)."""
    table, reference = slow_table
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    (out / "_parts" / "packed.json").unlink()
    (out / "shard-000001.stats.json").unlink()
    (out / ".shard-000002.tar.999.tmp").write_bytes(b"partial")
    (out / "shard-000003.tar").write_bytes(bytes(10240))
    for suffix in (".tar", ".parquet", ".stats.json"):
        shutil.copy(out / f"shard-000000{suffix}", out / f"shard-000009{suffix}")
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    hits = dict(server.hits)
    assert cli_main(common_args(table, out)) == 0
    assert dict(server.hits) == hits  # the parts were complete: nothing is downloaded again
    assert shard_contents(out) == shard_contents(reference)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before  # finished shards of this pack kept
    assert not hidden_files(out)


# The CLI in a child process whose pack stops for good inside the write of one chosen file: the content
# is in the file's temporary, not yet renamed. It says so in a marker file and waits to be killed, so the
# kill -9 lands at that point however the scheduler runs the two processes.
_STOPPING_CLI = """
import os, sys, time
from pathlib import Path
from data_pipelines.download import shard_writer
from data_pipelines.download.__main__ import main

stop_name, marker = sys.argv[1], Path(sys.argv[2])
atomic_write = shard_writer._atomic_write

def stopping_atomic_write(path, write):
    def write_then_stop(f):
        write(f)
        f.flush()
        # Renamed into place, so the test never reads it half written.
        marker.with_suffix(".tmp").write_text(str(path))
        os.replace(marker.with_suffix(".tmp"), marker)
        time.sleep(3600)
    return atomic_write(path, write_then_stop if path.name == stop_name else write)

shard_writer._atomic_write = stopping_atomic_write
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "stop_in",
    [
        # A new shard beyond the copy's 7, shards 0..8 written: its tar exists only as a temporary.
        "shard-000009.tar",
        # A shard of the copy being rewritten: new tar and parquet beside no stats (the old ones withdrawn).
        "shard-000003.stats.json",
    ],
)
def test_kill_9_during_the_pack_then_resume(
    server: FaultServer, slow_table, tmp_path: Path, stop_in: str
) -> None:
    """Repacking into shards of one sample (49 shards), killed in the middle of writing one of them."""
    table, reference = slow_table
    expected = tmp_path / "expected"
    shutil.copytree(reference, expected)
    assert cli_main([*common_args(table, expected), "--samples-per-shard", "1"]) == 0
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    args = [*common_args(table, out), "--samples-per-shard", "1"]
    marker = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPING_CLI, stop_in, str(marker), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # No race: the child stays stopped until killed; the deadline only bounds a child that never stops.
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the pack never reached the stop"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()  # only if an assertion above left it running
    assert marker.read_text() == str(out / stop_in)
    # Killed while packing: no manifest (the output is not finished), the file being written only under a
    # temporary name (no torn file, no old one left beside the new ones), later shards not written yet.
    assert not (out / "manifest.json").exists() and not (out / "_parts" / "packed.json").exists()
    assert not (out / stop_in).exists() and len(list(out.glob(f".{stop_in}.*.tmp"))) == 1
    assert (out / "shard-000002.stats.json").exists() and not (out / "shard-000048.stats.json").exists()
    stem = stop_in.partition(".")[0]
    if stop_in.endswith(".stats.json"):  # the tar and parquet, renamed in before the stats, are the new ones
        for suffix in (".tar", ".parquet"):
            assert (out / f"{stem}{suffix}").read_bytes() == (expected / f"{stem}{suffix}").read_bytes()
    else:
        assert not list(out.glob(f"{stem}.*"))
    hits = dict(server.hits)
    assert cli_main(args) == 0
    assert dict(server.hits) == hits
    assert shard_contents(out) == shard_contents(expected)
    assert not hidden_files(out)


def test_a_rerun_with_another_shard_size_repacks_without_downloading(
    server: FaultServer, slow_table, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table, reference = slow_table
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    hits = dict(server.hits)
    capsys.readouterr()
    assert cli_main([*common_args(table, out), "--samples-per-shard", "20"]) == 0
    assert dict(server.hits) == hits
    # The change is named, old value -> new, as the one setting that a rerun may change and that repacks.
    assert "--samples-per-shard 8 -> 20: the shards are repacked from the parts" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [20, 20, 9]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-{i:06d}.tar" for i in range(3)]
    fresh = tmp_path / "fresh"
    assert cli_main([*common_args(table, fresh, "--concurrency", "8"), "--samples-per-shard", "20"]) == 0
    assert shard_contents(out) == shard_contents(fresh)
    assert cli_main(common_args(table, out)) == 0  # and back
    assert shard_contents(out) == shard_contents(reference)


def test_retry_failed_refetches_only_failed_rows(tmp_path: Path) -> None:
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(8)]
        urls[2], urls[5] = server.url("/flaky/100.jpg"), server.url("/flaky/101.jpg")
        urls.append(server.url("/status/404"))
        # Row 11, in the second part, has the bytes of /flaky/100.jpg (row 2): a sample until row 2 is
        # retried, a duplicate after.
        urls += [server.url("/img/8.jpg"), server.url("/img/9.jpg"), server.url("/img/100.jpg")]
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        assert cli_main(common_args(table, out)) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert [s["num_samples"] for s in manifest["shards"]] == [8, 1] and manifest["duplicates"] == 0
        server.httpd.flaky_ok = True
        hits = dict(server.hits)
        assert cli_main(common_args(table, out, "--retry-failed")) == 0
        assert server.hits["/img/0.jpg"] == hits["/img/0.jpg"]  # successes are not fetched again
        assert server.hits["/flaky/100.jpg"] == hits["/flaky/100.jpg"] + 1
        assert server.hits["/status/404"] == hits["/status/404"] + 1
        fresh = tmp_path / "fresh"
        assert cli_main(common_args(table, fresh)) == 0
        assert shard_contents(out) == shard_contents(fresh)
        manifest = json.loads((out / "manifest.json").read_text())
        assert [s["num_samples"] for s in manifest["shards"]] == [8, 2] and manifest["duplicates"] == 1
        row = pq.read_table(out / "shard-000001.parquet").to_pylist()[-1]
        assert (row["row"], row["status"]) == (11, "duplicate")
        assert row["error"] == "same image bytes as key 000000002"
        # --retry-statuses narrows it: nothing is a timeout here, so nothing is fetched or repacked.
        hits = dict(server.hits)
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
        assert cli_main(common_args(table, out, "--retry-statuses", "timeout")) == 0
        assert dict(server.hits) == hits
        assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}


def _last_row(out: Path) -> dict:
    return pq.read_table(out / "shard-000000.parquet").to_pylist()[-1]


def test_a_rerun_with_another_input_or_settings_names_each_change_and_how_to_go_on(
    server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """It used to say only "(settings changed)", not which setting, its old value or what to do."""
    table = write_urls(tmp_path / "in.parquet", [server.url(f"/img/{i}.jpg") for i in (800, 801, 802)])
    out = tmp_path / "out"
    assert cli_main(common_args(table, out)) == 0
    hits = dict(server.hits)
    capsys.readouterr()
    changed = ["--image-size", "32", "--rows-per-part", "5", "--resize-mode", "longest"]
    assert cli_main([*common_args(table, out), *changed]) == 2
    assert capsys.readouterr().err == (
        f"error: {out} already holds a download made with other settings: --rows-per-part 10 -> 5, "
        "--image-size 24 -> 32, --resize-mode center_crop -> longest. To resume it, rerun with the settings "
        "it was made with (--rows-per-part 10 --image-size 24 --resize-mode center_crop); to download with "
        f"the new settings, use a new output folder (or remove {out} first)\n"
    )
    longer = write_urls(
        tmp_path / "longer.parquet", [server.url(f"/img/{i}.jpg") for i in (800, 801, 802, 803)]
    )
    assert cli_main(common_args(longer, out)) == 2
    assert capsys.readouterr().err == (
        f"error: {out} already holds a download of another input: {table} had 3 rows, {longer} has 4. To "
        "resume it, rerun with the input it was made from; to download with the new input, use a new output "
        f"folder (or remove {out} first)\n"
    )
    other = write_urls(tmp_path / "other.parquet", [server.url(f"/img/{i}.jpg") for i in (800, 801, 803)])
    assert cli_main([*common_args(other, out), "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"of another input: {other} has other URLs than {table} had in its 3 rows; and made " in err
    assert (
        "with other settings: --image-size 24 -> 32. To resume it, rerun with the input it was made " in err
    )
    assert "from and the settings it was made with (--image-size 24); to download with the new input " in err
    assert dict(server.hits) == hits  # each refused before any download


def test_every_setting_a_resume_keeps_is_named_by_its_option() -> None:
    """A refused rerun names each changed setting by the option that sets it (a setting missing from the
    table would be named by its internal key)."""
    settings = content_settings(DownloadConfig(input="in", output="out"))
    keys = {"rows_per_part"}
    for key, value in settings.items():
        keys |= {f"{key}.{sub}" for sub in value} if isinstance(value, dict) else {key}
    assert set(runner.SETTING_OPTIONS) == keys
    options = build_parser()._option_string_actions
    assert [o for o in runner.SETTING_OPTIONS.values() if o not in options] == ["ImageConfig.border_color"]


@pytest.mark.parametrize(("fails_in", "processes"), [("part", 1), ("part", 2), ("shard", 1)])
def test_a_write_that_fails_mid_run_ends_in_one_line_and_the_same_command_resumes(
    server: FaultServer, tmp_path: Path, fails_in: str, processes: int
) -> None:
    """A write that fails part-way (a full disk) used to end in a traceback. Here the child's file size
    limit (RLIMIT_FSIZE) fails it with EFBIG, as a full disk fails it with ENOSPC, through the same path.
    Parts of 10 rows (tars of about 35 kB) exceed the 15 kB limit; parts of one row (one 10 kB tar record)
    do not, and then the pack's shard of 12 samples does."""
    table = write_urls(tmp_path / "in.parquet", [server.url(f"/img/{i}.jpg") for i in range(810, 822)])
    rows_per_part = "10" if fails_in == "part" else "1"
    sizes = ["--rows-per-part", rows_per_part, "--samples-per-shard", "12"]
    fresh = tmp_path / "fresh"
    assert cli_main([*common_args(table, fresh), *sizes]) == 0
    out = tmp_path / "out"
    args = [*common_args(table, out), *sizes]
    result = run_download_cli([*args, "--processes", str(processes)], file_size_limit=15_000)
    failed = out / "_parts" / "part-000000.tar" if fails_in == "part" else out / "shard-000000.tar"
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot write {failed} (on the file system mounted at ")
    assert (
        "): File too large; the files finished before are intact: raise the file size limit" in result.stderr
    )
    assert result.stderr.endswith(", then rerun the same command to resume\n")
    assert result.stderr.count("\n") == 1  # one line, no traceback
    # Nothing torn under a final name, no temporary left behind, no manifest: a resumable state.
    assert not failed.exists() and not hidden_files(out) and not (out / "manifest.json").exists()
    hits = dict(server.hits)
    assert cli_main(args) == 0
    if fails_in == "shard":  # every part was complete: the rerun only packs
        assert dict(server.hits) == hits
    assert shard_contents(out) == shard_contents(fresh)


def test_a_retry_that_changes_only_the_reason_repacks(tmp_path: Path) -> None:
    """Row 5 fails before and after the retry with the same status, only the HTTP code differs: no count
    or size of the part changes, yet the final parquet must show the new reason."""
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(5)] + [server.url("/switch/0.jpg")]
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        assert cli_main(common_args(table, out)) == 0
        row = _last_row(out)
        assert (row["status"], row["http_status"], row["error"]) == ("http_error", 404, "HTTP 404")
        server.httpd.switch_status = 410
        assert cli_main(common_args(table, out, "--retry-failed")) == 0
        row = _last_row(out)
        assert (row["status"], row["http_status"], row["error"]) == ("http_error", 410, "HTTP 410")
        fresh = tmp_path / "fresh"
        assert cli_main(common_args(table, fresh)) == 0
        assert shard_contents(out) == shard_contents(fresh)


def test_a_part_rewritten_with_the_same_stats_is_repacked(tmp_path: Path) -> None:
    """The retry above, with its part's timing equal to the first run's (which real runs hit when the
    milliseconds coincide): the part's stats carry the same counts, sizes and seconds, and only its rows
    differ. The pack must still see the new part."""
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(5)] + [server.url("/status/404")]
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        assert cli_main(common_args(table, out)) == 0
        parts = out / "_parts"
        old_stats = json.loads((parts / "part-000000.stats.json").read_text())
        records = pq.read_table(parts / "part-000000.parquet").to_pylist()
        records[-1].update(http_status=410, error="HTTP 410")
        samples = list(read_samples(parts / "part-000000.tar").values())
        timing = {k: old_stats[k] for k in ("seconds", "retried_rows")}
        write_part(parts, 0, samples, records, timing)
        new_stats = json.loads((parts / "part-000000.stats.json").read_text())
        assert {k: v for k, v in new_stats.items() if k != "parquet_sha256"} == {
            k: v for k, v in old_stats.items() if k != "parquet_sha256"
        }
        assert cli_main(common_args(table, out)) == 0
        assert (_last_row(out)["http_status"], _last_row(out)["error"]) == (410, "HTTP 410")


def test_delete_parts_keeps_the_shards_and_refuses_retry(
    server: FaultServer, slow_table, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table, reference = slow_table
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    assert cli_main(common_args(table, out, "--delete-parts")) == 0
    assert [p.name for p in (out / "_parts").iterdir()] == ["packed.json"]
    assert shard_contents(out) == shard_contents(reference)
    hits = dict(server.hits)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli_main(common_args(table, out)) == 0  # finished: nothing to download (the parts are gone)
    assert dict(server.hits) == hits and before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert cli_main(common_args(table, out, "--retry-failed")) == 2
    assert "were deleted after packing (--delete-parts), so its failed rows cannot be retried" in (
        capsys.readouterr().err
    )
    assert cli_main([*common_args(table, out), "--samples-per-shard", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --samples-per-shard 8 -> 20: the parts of {out} were deleted after packing"
    )
    assert "rerun with --samples-per-shard 8 to see its summary, or download into a new output folder" in err
    assert dict(server.hits) == hits and shard_contents(out) == shard_contents(reference)


def test_a_run_without_any_image_fails_writes_no_shard_and_can_be_retried(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every row failing (an outage, a wrong column) used to exit 0 with a manifest of one empty shard."""
    with FaultServer() as server:
        urls = [server.url("/flaky/300.jpg"), "ftp://example.com/x.jpg"] * 6  # 2 parts, 12 failures
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        assert cli_main(common_args(table, out)) == 1
        captured = capsys.readouterr()
        assert "; no image in the whole output, so no shard was written; output: " in captured.out
        err = captured.err
        assert f"error: no image was downloaded: all 12 input row(s) of {table} failed" in err
        assert f"http_error: 6 row(s), e.g. {server.url('/flaky/300.jpg')}: HTTP 503" in err
        assert "bad_url: 6 row(s), e.g. ftp://example.com/x.jpg: " in err
        assert "is --url-column the image URL column?" in err and "--retry-failed" in err
        assert sorted(p.name for p in out.iterdir()) == ["_parts", "_plan"]  # no shard, no manifest
        # What an older version left (one empty shard and its manifest) goes on the next run; the same
        # command fetches nothing and fails the same way; --delete-parts keeps the parts (the reasons).
        for name in ("shard-000000.tar", "shard-000000.parquet", "shard-000000.stats.json", "manifest.json"):
            (out / name).write_text("{}")
        (out / "_parts" / "packed.json").write_text("{}")
        hits = dict(server.hits)
        assert cli_main(common_args(table, out, "--delete-parts")) == 1
        assert dict(server.hits) == hits
        assert sorted(p.name for p in out.iterdir()) == ["_parts", "_plan"]
        assert len(list((out / "_parts").glob("part-*.tar"))) == 2
        assert not (out / "_parts" / "packed.json").exists()
        # The server recovers: a retry fetches only the failed rows and the output is a fresh run's.
        server.httpd.flaky_ok = True
        assert cli_main(common_args(table, out, "--retry-failed")) == 0
        fresh = tmp_path / "fresh"
        assert cli_main(common_args(table, fresh)) == 0
        assert shard_contents(out) == shard_contents(fresh)
        assert json.loads((out / "manifest.json").read_text())["num_samples"] == 1  # the others: duplicates


def test_every_failure_status_has_advice() -> None:
    # A status without an entry would get only the generic "see the reasons" line in the no-image report.
    assert set(_CHECKS) == set(FAILURE_STATUSES)


def test_an_older_versions_empty_shard_with_deleted_parts_is_reported_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An older version packed an output without images into one empty shard; with its parts deleted since,
    a rerun can only report it: the report must say the shard is there, not that none was written."""
    urls = ["ftp://example.com/x.jpg", "ftp://example.com/y.jpg"] * 6  # refused before any connection
    table = write_urls(tmp_path / "in.parquet", urls)
    out = tmp_path / "out"
    assert cli_main(common_args(table, out)) == 1  # parts kept, no shard
    # What the older version then left: the parts packed into one shard of zero samples, parts deleted.
    plan = Plan(**json.loads((out / "_plan" / "plan.json").read_text()))
    assert pack(plan, 8).manifest["num_samples"] == 0
    delete_parts(plan)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert cli_main(common_args(table, out)) == 1
    captured = capsys.readouterr()
    assert "; no image in the whole output: its 1 shard(s) hold 0 samples; output: " in captured.out
    err = captured.err
    assert f"so {out} still holds the empty shard and the manifest that an older version" in err
    assert "no shard and no manifest" not in err
    assert "bad_url: 12 row(s), e.g. ftp://example.com/x.jpg: only http(s) URLs" in err  # from the shard
    assert f"Every row's reason is in {out}/shard-*.parquet." in err and "cannot be retried" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # left as it was


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if (stat := _proc_stat(p)) is not None and stat[1] == pid]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_end_with_a_killed_launcher(tmp_path: Path) -> None:
    """kill -9 of the launcher while its two workers wait on slow servers: the workers must not run on
    (an orphan could later write a part that a rerun is writing)."""
    with FaultServer() as server:
        server.httpd.slow_seconds = 60
        table = write_urls(tmp_path / "in.parquet", [server.url("/slow-headers.jpg")] * 4)
        args = common_args(
            tmp_path / "in.parquet", tmp_path / "out", "--processes", "2", "--rows-per-part", "2"
        )
        args += ["--parts-in-flight", "1", "--read-timeout", "120", "--total-timeout", "120"]
        assert table.exists()
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_pipelines.download", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 60
            while server.hits["/slow-headers.jpg"] < 4:  # both workers are waiting on their part's rows
                assert proc.poll() is None and time.monotonic() < deadline, "the download did not start"
                time.sleep(0.05)
            workers = [
                p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            assert len(workers) == 2
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            deadline = time.monotonic() + 5
            alive = workers
            while alive and time.monotonic() < deadline:
                time.sleep(0.05)
                # A zombie has ended: only its entry waits for whoever adopted it to reap it.
                alive = [p for p in workers if (stat := _proc_stat(p)) is not None and stat[0] != "Z"]
            assert not alive, f"workers {alive} outlived their launcher"
        finally:
            proc.kill()
            for pid in workers:  # only the workers this test started, should the check above fail
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not list((tmp_path / "out" / "_parts").glob("part-*"))


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


@pytest.mark.slow
def test_a_submitit_array_counts_this_runs_rows_and_successes(tmp_path: Path, capsys) -> None:
    """Array tasks report nothing until they end; the launcher counts from the parts they finish. On a retry
    only the rows fetched again count, and only those that now succeed (2 of 3 here)."""
    with FaultServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(14)]
        urls[2], urls[12] = server.url("/flaky/100.jpg"), server.url("/flaky/101.jpg")
        urls[5] = server.url("/status/404")
        table = write_urls(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        array = ("--submitit-local", "--slurm-array-size", "2", "--no-progress")
        assert cli_main(common_args(table, out, *array)) == 0
        assert "downloaded 11/14 rows into 2 part(s)" in capsys.readouterr().out
        server.httpd.flaky_ok = True
        assert cli_main(common_args(table, out, *array, "--retry-failed")) == 0
        assert "downloaded 2/3 rows into 2 part(s)" in capsys.readouterr().out
