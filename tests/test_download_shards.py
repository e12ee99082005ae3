"""End to end: a table of good and faulty URLs -> parts -> final shards of a fixed number of samples, with
stats, per-row parquet and manifest; exact duplicates dropped over the whole dataset."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from download_support import (
    TEST_USER_AGENT,
    FaultServer,
    jpeg_image,
    run_download_cli,
    write_img2dataset_shards,
)

from clip_train.data.shards import ShardError, count_samples, expand_urls
from data_pipelines.download import DownloadConfig, FetchConfig, ImageConfig, InputError, run_download
from data_pipelines.download.__main__ import build_parser, config_from_args
from data_pipelines.download.__main__ import main as cli_main
from data_pipelines.download.plan import read_input
from data_pipelines.download.shard_writer import read_samples, tar_bytes

GOOD = [f"/img/{i}.jpg" for i in range(12)] + ["/png/1.png", "/redirect/2/40.jpg", "/optout/other-agent.jpg"]
BAD = {
    "/status/404": "http_error",
    "/status/500": "http_error",
    "/slow-headers.jpg": "timeout",
    "/drip.jpg": "timeout",
    "/reset.jpg": "connection_error",
    "/truncated.jpg": "decode_error",
    "/corrupt.jpg": "decode_error",
    "/text.jpg": "bad_content_type",
    "/html.jpg": "not_an_image",
    "/bomb.png": "decompression_bomb",
    "/redirect-loop.jpg": "too_many_redirects",
    "/optout/noai.jpg": "opted_out",
    "/optout/scoped.jpg": "opted_out",
    "/private/3.jpg": "robots_disallowed",
    "/dup/4.jpg": "duplicate",  # same bytes as /img/4.jpg, the row before it (the same part)
    "/dup/2.jpg": "duplicate",  # same bytes as /img/2.jpg, in the first part; this one is in the last
}
SAMPLES_PER_SHARD = 6
ROWS_PER_PART = 10
# Every test here takes seconds (the fault run about 5); a hang fails in a minute, not at the suite's 600 s.
pytestmark = pytest.mark.timeout(120)


def fast_fetch(**overrides: object) -> FetchConfig:
    settings = dict(
        user_agent=TEST_USER_AGENT,
        connect_timeout=0.5,
        read_timeout=0.5,
        total_timeout=2.0,
        retries=1,
        backoff=0.05,
        allow_private_addresses=True,
    )
    settings.update(overrides)
    return FetchConfig(**settings)


def write_table(path: Path, urls: list, **extra: list) -> Path:
    table = pa.table({"url": urls, "text": [f"caption {i}" for i in range(len(urls))], **extra})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture(scope="module")
def fault_run(server: FaultServer, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("faults")
    # Interleave good and bad rows; /dup/4.jpg comes right after /img/4.jpg, /dup/2.jpg last.
    paths, good_iter, bad_iter = [], iter(GOOD), iter(BAD)
    for i in range(len(GOOD) + len(BAD)):
        paths.append(
            next(good_iter, None) or next(bad_iter) if i % 2 == 0 else next(bad_iter, None) or next(good_iter)
        )
    paths.remove("/dup/4.jpg")
    paths.insert(paths.index("/img/4.jpg") + 1, "/dup/4.jpg")
    paths.remove("/dup/2.jpg")
    paths.append("/dup/2.jpg")
    urls = [server.url(p) for p in paths] + ["ftp://example.com/x.jpg", None, server.blackhole_url]
    expected_bad = {**{server.url(p): s for p, s in BAD.items()}, "ftp://example.com/x.jpg": "bad_url"}
    expected_bad[server.blackhole_url] = "timeout"
    table = write_table(
        tmp / "in.parquet",
        urls,
        query=[f"q{i % 3}" for i in range(len(urls))],
        matched_queries=[[f"q{i % 3}"] for i in range(len(urls))],
        source=["test"] * len(urls),
    )
    config = DownloadConfig(
        input=str(table),
        output=str(tmp / "out"),
        samples_per_shard=SAMPLES_PER_SHARD,
        rows_per_part=ROWS_PER_PART,
        fetch=fast_fetch(),
        image=ImageConfig(image_size=32),
    )
    summary = run_download(config, progress=False, log=lambda _: None)
    return tmp / "out", urls, expected_bad, summary


def test_every_url_ends_in_a_shard_or_has_a_reason(fault_run, server: FaultServer) -> None:
    out, urls, expected_bad, summary = fault_run
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("shard-*.parquet"))]).to_pylist()
    assert [r["row"] for r in rows] == list(range(len(urls)))
    by_url = {r["url"]: r for r in rows if r["url"]}
    for path in GOOD:
        assert by_url[server.url(path)]["status"] == "success", by_url[server.url(path)]
    for url, status in expected_bad.items():
        assert by_url[url]["status"] == status and by_url[url]["error"], by_url[url]
    assert next(r for r in rows if r["url"] is None)["status"] == "bad_url"
    assert summary.total_samples == len(GOOD) and not summary.incomplete_parts
    # The run's time is bounded because each slow URL is ended by the limit meant for it (the drip would
    # run 10 s, the silent server answer after 3 s), once per attempt (retries=1); the row records which.
    limits = {
        server.url("/slow-headers.jpg"): "reading data",
        server.url("/drip.jpg"): "total timeout",
        server.blackhole_url: "connection timeout",
    }
    for url, limit in limits.items():
        assert limit in by_url[url]["error"].lower() and by_url[url]["attempts"] == 2, by_url[url]
    for folder in (out, out / "_parts"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_duplicates_are_dropped_across_parts_with_the_key_they_repeat(fault_run, server: FaultServer) -> None:
    out, *_ = fault_run
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("shard-*.parquet"))]).to_pylist()
    by_url = {r["url"]: r for r in rows if r["url"]}
    for dup, first in (("/dup/4.jpg", "/img/4.jpg"), ("/dup/2.jpg", "/img/2.jpg")):
        dup_row, first_row = by_url[server.url(dup)], by_url[server.url(first)]
        assert dup_row["error"] == f"same image bytes as key {first_row['key']}"
        assert dup_row["source_sha256"] == first_row["source_sha256"] and dup_row["sha256"] is None
    # /dup/2.jpg really is in another part than the image it repeats, where it was downloaded as a success.
    dup_row, first_row = by_url[server.url("/dup/2.jpg")], by_url[server.url("/img/2.jpg")]
    assert dup_row["row"] // ROWS_PER_PART != first_row["row"] // ROWS_PER_PART
    part = pq.read_table(out / "_parts" / f"part-{dup_row['row'] // ROWS_PER_PART:06d}.parquet").to_pylist()
    assert next(r for r in part if r["row"] == dup_row["row"])["status"] == "success"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["duplicates"] == manifest["status_counts"]["duplicate"] == 2
    stored = [m["source_sha256"] for tar in sorted(out.glob("shard-*.tar")) for m in _metas(tar)]
    assert len(stored) == len(set(stored)) == len(GOOD)


def _metas(tar_path: Path) -> list[dict]:
    return [s.meta for s in read_samples(tar_path).values()]


def test_final_shards_hold_a_fixed_number_of_samples_copied_from_the_parts(fault_run) -> None:
    out, urls, *_ = fault_run
    manifest = json.loads((out / "manifest.json").read_text())
    counts = [s["num_samples"] for s in manifest["shards"]]
    assert counts == [SAMPLES_PER_SHARD] * (len(GOOD) // SAMPLES_PER_SHARD) + [len(GOOD) % SAMPLES_PER_SHARD]
    assert manifest["samples_per_shard"] == SAMPLES_PER_SHARD
    assert manifest["num_parts"] == -(-len(urls) // ROWS_PER_PART) == 4
    parts = {}
    for tar in sorted((out / "_parts").glob("part-*.tar")):
        parts.update(read_samples(tar))
    previous_end = 0
    for entry in manifest["shards"]:
        tar = out / entry["name"]
        samples = read_samples(tar)
        # Member bytes are the parts' own (no re-encoding), and the assembled tar is exactly the tar the
        # part writer would give for these samples.
        assert all(samples[k] == parts[k] for k in samples)
        assert tar.read_bytes() == tar_bytes(samples.values())
        # Each final parquet covers a contiguous interval of input rows, the next one starting after it.
        rows = pq.read_table(tar.with_suffix(".parquet"), columns=["row"]).column("row").to_pylist()
        assert rows == list(range(previous_end, previous_end + len(rows)))
        previous_end += len(rows)


def test_the_trainer_refuses_an_output_whose_pack_did_not_finish(fault_run, tmp_path: Path) -> None:
    """A kill during a repack leaves shards of two packs side by side and no manifest: a brace pattern
    over them must fail with the fix, not count whatever stats are there."""
    out = tmp_path / "out"
    shutil.copytree(fault_run[0], out)
    pattern = str(out / json.loads((out / "manifest.json").read_text())["pattern"])
    assert count_samples(expand_urls(pattern))[0] == len(GOOD)
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match=rf"the download into {re.escape(str(out))} did not finish .*rerun"):
        count_samples(expand_urls(pattern))


def test_shards_read_with_plain_webdataset(fault_run, server: FaultServer) -> None:
    out, *_ = fault_run
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))]
    assert manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"]) == len(GOOD)
    pattern = str(out / manifest["pattern"])
    samples = list(
        wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    )
    assert len(samples) == len(GOOD)
    keys = [k for k, *_ in samples]
    assert keys == sorted(keys) and all(len(k) == 9 for k in keys)
    for key, image, text, meta in samples:
        assert image.size == (32, 32) and meta["key"] == key and meta["text"] == text
        assert {"url", "original_width", "original_height", "width", "height", "sha256", "query"} <= set(meta)
        assert meta["matched_queries"] == [meta["query"]]
    meta = next(m for _, _, _, m in samples if m["url"] == server.url("/img/0.jpg"))
    assert (meta["original_width"], meta["original_height"], meta["width"]) == (64, 48, 32)
    # The trainer takes the folder for its shards and counts samples from the manifest.
    urls = expand_urls(str(out))
    assert urls == [str(out / n) for n in names] and count_samples(urls)[0] == len(GOOD)
    for i, entry in enumerate(manifest["shards"]):
        stats = json.loads((out / f"shard-{i:06d}.stats.json").read_text())
        assert stats["num_samples"] == entry["num_samples"] == stats["status_counts"].get("success", 0)
        assert stats["rows"] == pq.read_metadata(out / f"shard-{i:06d}.parquet").num_rows
        with tarfile.open(out / entry["name"]) as tar:
            assert len(tar.getnames()) == 3 * entry["num_samples"]


@pytest.mark.parametrize(
    ("kinds", "per_shard", "shards"),
    [
        # good (g) and failing (b) rows, parts of 2 rows -> each shard's rows; a shard starts at its first
        # sample (shard 0 at row 0) and runs to the row before the next one's first sample.
        ("bgbgb", 1, [[0, 1, 2], [3, 4]]),
        ("ggg", 1, [[0], [1], [2]]),
        ("gbggbbg", 2, [[0, 1, 2], [3, 4, 5, 6]]),
        ("ggg", 5, [[0, 1, 2]]),
        ("bbbbg", 2, [[0, 1, 2, 3, 4]]),  # one sample, in the last part
    ],
)
def test_shard_boundaries(server: FaultServer, tmp_path: Path, kinds: str, per_shard: int, shards) -> None:
    bad = "ftp://example.com/x.jpg"
    urls = [server.url(f"/img/{i}.jpg") if k == "g" else bad for i, k in enumerate(kinds)]
    table = write_table(tmp_path / "in.parquet", urls)
    config = DownloadConfig(
        input=str(table),
        output=str(tmp_path / "out"),
        samples_per_shard=per_shard,
        rows_per_part=2,
        fetch=fast_fetch(),
        image=ImageConfig(image_size=16),
    )
    summary = run_download(config, progress=False, log=lambda _: None)
    out = tmp_path / "out"
    rows = [pq.read_table(p).column("row").to_pylist() for p in sorted(out.glob("shard-*.parquet"))]
    assert rows == shards and summary.num_shards == len(shards)
    for tar, shard_rows in zip(sorted(out.glob("shard-*.tar")), shards):
        keys = sorted(read_samples(tar))
        assert keys == [f"{r:09d}" for r in shard_rows if kinds[r] == "g"]
        assert tar.read_bytes() == tar_bytes(read_samples(tar).values())


def test_rerun_of_a_finished_output_does_nothing(fault_run) -> None:
    out, *_ = fault_run

    def mtimes() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in [*out.iterdir(), *(out / "_parts").iterdir()]}

    before = mtimes()
    config = DownloadConfig(
        input=str(out.parent / "in.parquet"),
        output=str(out),
        samples_per_shard=SAMPLES_PER_SHARD,
        rows_per_part=ROWS_PER_PART,
        fetch=fast_fetch(),
        image=ImageConfig(image_size=32),
    )
    summary = run_download(config, progress=False, log=lambda _: None)
    assert summary.rows == 0 and summary.total_samples == len(GOOD) and summary.duplicates == 2
    assert before == mtimes()
    for changed, named in (
        ({"image": ImageConfig(image_size=64)}, "--image-size 32 -> 64"),
        ({"rows_per_part": 12}, f"--rows-per-part {ROWS_PER_PART} -> 12"),
    ):
        with pytest.raises(InputError, match=f"made with other settings: {named}\\. To resume it"):
            run_download(dataclasses.replace(config, **changed), progress=False)


def test_csv_jsonl_folders_and_column_names(server: FaultServer, tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for part in range(2):
        lines = [
            json.dumps({"link": server.url(f"/img/{part * 3 + i}.jpg"), "caption": f"c{i}"}) for i in range(3)
        ]
        (folder / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    csv = tmp_path / "in.csv"
    csv.write_text("link,caption\n" + "".join(f"{server.url(f'/img/{i}.jpg')},c{i}\n" for i in range(6)))
    for source in (folder, csv):
        out = tmp_path / f"out-{source.name}"
        code = cli_main(
            [
                str(source),
                str(out),
                "--url-col",
                "link",
                "--text-col",
                "caption",
                "--allow-private-addresses",
                "--image-size",
                "16",
                "--no-progress",
                "--format",
                "webp",
            ]
        )
        assert code == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_samples"] == 6
        with tarfile.open(out / "shard-000000.tar") as tar:
            assert tar.getnames()[:3] == ["000000000.webp", "000000000.txt", "000000000.json"]


def test_cli_shows_progress_and_ends_with_a_one_line_summary(
    server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    urls = [server.url(f"/img/{i}.jpg") for i in range(6)] + [server.url("/status/404")]
    table = write_table(tmp_path / "in.parquet", urls)
    out_dir = tmp_path / "out"
    argv = [str(table), str(out_dir), "--allow-private-addresses", "--image-size", "16"]
    code = cli_main([*argv, "--user-agent", TEST_USER_AGENT, "--retries", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    # The bar (on stderr) counts rows and shows the images/s and success rate of the run.
    assert "7/7" in err and re.search(r"\d+ img/s, ok \d+\.\d%", err)
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"7 input rows -> 1 part(s) of 10000 rows in {out_dir / '_parts'}; ")
    assert re.fullmatch(
        r"packed 1 part\(s\) into 1 shard\(s\) of 10000 samples \(1 written, 0 duplicate\(s\) dropped\) "
        r"in [\d.]+ s",
        lines[1],
    )
    assert lines[-2] == "statuses over the whole output: success 6, http_error 1"
    assert re.fullmatch(
        rf"downloaded 6/7 rows into 1 part\(s\) in [\d.]+ s \(\d+ images/s\); 6 samples in 1 shard\(s\), "
        rf"0 duplicate\(s\) dropped; output: {re.escape(str(out_dir))}",
        lines[-1],
    )


def test_bad_input_fails_before_any_work(
    server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    # Loopback, allowed: a check that let the run start would fetch the URL, which the hits show.
    fetch = fast_fetch()
    with pytest.raises(InputError, match="does not exist"):
        run_download(
            DownloadConfig(input=str(tmp_path / "missing.parquet"), output=str(out), fetch=fetch),
            progress=False,
        )
    table = write_table(tmp_path / "in.parquet", [server.url("/img/900.jpg")])
    config = DownloadConfig(input=str(table), output=str(out), text_col="caption", fetch=fetch)
    with pytest.raises(InputError, match="no column 'caption'"):
        run_download(config, progress=False)
    code = cli_main([str(table), str(out), "--url-col", "link", "--no-progress", "--allow-private-addresses"])
    assert server.hits["/img/900.jpg"] == 0 and code == 2
    err = capsys.readouterr().err
    assert "no column 'link'" in err and "--url-column / --text-column" in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["read-only output folder", "inside a read-only folder", "below a file"])
def test_an_unwritable_output_folder_is_refused_before_any_work(
    server: FaultServer, tmp_path: Path, where: str
) -> None:
    """It used to end in a traceback with exit 1, the code of "parts incomplete, rerun"."""
    table = write_table(tmp_path / "in.parquet", [server.url("/img/903.jpg")])
    locked = tmp_path / "locked"
    locked.mkdir()
    if where == "below a file":  # refuses root as well: nothing can be made below a regular file
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "out"
        expected = f"error: output folder {out}: cannot be made, {tmp_path / 'file'} is a file; "
    elif where == "inside a read-only folder":
        out = locked / "out"
        expected = f"error: output folder {out}: cannot create it in {locked} (Permission denied); "
    else:
        out = locked
        expected = f"error: output folder {out}: cannot write into {locked} (Permission denied); "
    locked.chmod(0o555)
    try:
        result = run_download_cli([str(table), str(out), "--no-progress", "--allow-private-addresses"])
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and server.hits["/img/903.jpg"] == 0
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1  # one line
    assert result.stderr.endswith("give another output folder\n")
    assert list(locked.iterdir()) == []


def test_an_output_made_read_only_is_refused_only_when_there_is_work(
    server: FaultServer, tmp_path: Path
) -> None:
    """A finished output made read-only (to protect it) still reports on a rerun, as it did; one with a
    part left to download is refused before any download, naming the folder the parts go to, instead of
    failing at the part's write with a traceback."""
    table = write_table(tmp_path / "in.parquet", [server.url(f"/img/{i}.jpg") for i in (904, 905)])
    out = tmp_path / "out"
    args = [str(table), str(out), "--no-progress", "--allow-private-addresses", "--rows-per-part", "1"]
    assert cli_main(args) == 0
    folders = [out, out / "_parts", out / "_plan"]
    for folder in folders:
        folder.chmod(0o555)
    try:
        finished = run_download_cli(args)
        # Only the parts' folder stays read-only, as if killed before part 1's stats were written.
        out.chmod(0o755)
        (out / "_parts").chmod(0o755)
        (out / "_parts" / "part-000001.stats.json").unlink()
        (out / "_parts").chmod(0o555)
        hits = dict(server.hits)
        unfinished = run_download_cli(args)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert finished.returncode == 0, finished.stderr
    assert "2 samples in 1 shard(s)" in finished.stdout
    assert unfinished.returncode == 2 and dict(server.hits) == hits
    assert unfinished.stderr == (
        f"error: output folder {out}: cannot write into {out / '_parts'} (Permission denied); make it "
        "writable or give another output folder\n"
    )


def test_an_input_without_rows_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An empty table used to give exit 0 and a manifest of one shard of zero samples."""
    table = write_table(tmp_path / "in.parquet", pa.array([], pa.string()))
    out = tmp_path / "out"
    assert cli_main([str(table), str(out), "--no-progress"]) == 2
    assert f"input {table} has no rows, so there is nothing to download" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("spelling", [("--url-column", "--text-column"), ("--url-col", "--text-col")])
def test_column_options_share_the_spelling_of_extract(spelling: tuple[str, str]) -> None:
    """`--url-column/--text-column` as in `python -m data_pipelines.extract`; the old names still work."""
    url_flag, text_flag = spelling
    args = build_parser().parse_args(["in.parquet", "out", url_flag, "link", text_flag, "caption"])
    config = config_from_args(args)
    assert (config.url_col, config.text_col) == ("link", "caption")
    assert "--url-column URL_COLUMN, --url-col URL_COLUMN" in build_parser().format_help()


@pytest.mark.timeout(30)  # without the check, --concurrency 0 hangs
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--concurrency", "0", "concurrency (--concurrency) must be at least 1, got 0"),
        ("--concurrency", "-3", "concurrency (--concurrency) must be at least 1, got -3"),
        ("--per-host", "0", "per_host (--per-host) must be at least 1, got 0"),
        ("--connect-timeout", "0", "connect_timeout (--connect-timeout) must be above 0 seconds, got 0.0"),
        ("--read-timeout", "-1", "read_timeout (--read-timeout) must be above 0 seconds, got -1.0"),
        ("--total-timeout", "nan", "total_timeout (--total-timeout) must be above 0 seconds, got nan"),
        ("--retries", "-1", "retries (--retries) must be at least 0, got -1"),
        ("--backoff", "-0.5", "backoff (--backoff) must be at least 0, got -0.5"),
        ("--max-redirects", "-1", "max_redirects (--max-redirects) must be at least 0, got -1"),
        ("--max-bytes", "0", "max_bytes (--max-bytes) must be at least 1, got 0"),
    ],
)
def test_network_limits_out_of_range_are_refused_at_once(
    server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str, message: str
) -> None:
    """Bad settings, so exit 2 before any work. --concurrency 0 used to hang for ever and --per-host 0 to
    mean no limit at all; the timeouts, --max-redirects and --max-bytes out of range failed every row,
    which ended in exit 1 as if every server had failed; negative --retries or --backoff passed."""
    # Refused at once, not after a download: the loopback URL (allowed) is never fetched.
    table = write_table(tmp_path / "in.parquet", [server.url("/img/901.jpg")])
    out = tmp_path / "out"
    code = cli_main([str(table), str(out), "--no-progress", "--allow-private-addresses", flag, value])
    assert server.hits["/img/901.jpg"] == 0 and code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="must be at least 1"):
        FetchConfig(per_host=-1)


def test_an_unknown_retry_status_is_refused_with_the_valid_ones(
    server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A misspelt status used to match no row: nothing retried, exit 0."""
    table = write_table(tmp_path / "in.parquet", [server.url("/img/902.jpg")])
    out = tmp_path / "out"
    args = [str(table), str(out), "--no-progress", "--allow-private-addresses"]
    code = cli_main([*args, "--retry-statuses", "timeout,http_eror"])
    assert server.hits["/img/902.jpg"] == 0 and code == 2
    err = capsys.readouterr().err
    assert "unknown status(es) in retry_statuses (--retry-statuses): 'http_eror'" in err
    assert "http_error" in err and "decode_error" in err and "connection_error" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="'duplicate'"):
        DownloadConfig(input="in", output="out", retry_statuses=("duplicate",))


@pytest.mark.parametrize("column", ["url", "source"])
def test_a_column_that_is_not_text_is_an_input_error(tmp_path: Path, column: str) -> None:
    """A list-typed column used to raise ArrowNotImplementedError from the cast."""
    columns = {"url": ["http://example.com/a.jpg"], "text": ["a"], "source": ["web"], column: [["x", "y"]]}
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputError, match=rf"input {re.escape(str(path))}: column '{column}' has type list"):
        read_input(path)


def test_an_input_folder_reads_its_table_parts_and_skips_json_metadata(tmp_path: Path) -> None:
    # The balancer's output folder: parquet parts next to stats.json; the downloader takes it as it is.
    folder = tmp_path / "candidates"
    folder.mkdir()
    write_table(folder / "part-00000.parquet", ["http://example.com/a.jpg", "http://example.com/b.jpg"])
    write_table(folder / "part-00001.parquet", ["http://example.com/c.jpg"])
    (folder / "stats.json").write_text(json.dumps({"totals": {"kept": 3}}))
    assert read_input(folder).column("url").to_pylist()[-1] == "http://example.com/c.jpg"
    assert read_input(folder).num_rows == 3
    (folder / "extra.csv").write_text("url,text\nhttp://example.com/d.jpg,d\n")
    with pytest.raises(InputError, match="mixes formats"):
        read_input(folder)
    empty = tmp_path / "only-metadata"
    empty.mkdir()
    (empty / "stats.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds no \.parquet"):
        read_input(empty)


def test_img2dataset_layout_writer(tmp_path: Path) -> None:
    tars = write_img2dataset_shards(tmp_path, [3, 2], image_size=16)
    assert [t.name for t in tars] == ["00000.tar", "00001.tar"]
    assert json.loads((tmp_path / "00001_stats.json").read_text())["successes"] == 2
    assert pq.read_table(tmp_path / "00000.parquet").column("key").to_pylist() == [
        "000000000",
        "000000001",
        "000000002",
    ]
    samples = list(
        wds.WebDataset(str(tmp_path / "{00000..00001}.tar"), shardshuffle=False).to_tuple("__key__", "jpg")
    )
    assert [k for k, _ in samples] == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert samples[0][1] == jpeg_image(0, 16, 16)
