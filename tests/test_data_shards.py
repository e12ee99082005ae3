"""Shard lists and bad input: every problem fails in setup(), before a worker starts, naming the fix."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_support import ToyTokenizer, jpeg_bytes, write_crawler_shards, write_img2dataset_shards
from download_support import write_img2dataset_shards as write_real_img2dataset_output
from PIL import Image

from clip_train.data import ShardError, WebDatasetDataModule, expand_urls
from clip_train.data.shards import check_readable, count_samples, parse_sources
from clip_train.training.preflight import ConfigError, per_rank_batch_size


def _dm(shards, **kw) -> WebDatasetDataModule:
    kw = {"batch_size": 4, "num_workers": 0, "image_size": 32, "tokenizer": ToyTokenizer(), **kw}
    return WebDatasetDataModule(shards, **kw)


def test_expand_urls_and_sources() -> None:
    assert expand_urls("d/shard-{000000..000002}.tar") == [f"d/shard-00000{i}.tar" for i in range(3)]
    assert expand_urls(["a-{0..1}.tar", "b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]
    with pytest.raises(ShardError, match="twice"):
        expand_urls(["a-{0..1}.tar", "a-1.tar"])
    sources = parse_sources([{"urls": "a-{0..3}.tar", "weight": 3}, {"urls": ["b-0.tar", "b-1.tar"]}])
    assert [len(s.urls) for s in sources] == [4, 2] and [s.weight for s in sources] == [3.0, 1.0]
    with pytest.raises(ShardError, match="weight"):
        parse_sources([{"urls": "a.tar", "weight": 0}])
    with pytest.raises(ShardError, match="no shards"):
        parse_sources([])


def test_counts_from_manifest_and_img2dataset_stats(tmp_path: Path) -> None:
    ours = write_crawler_shards(tmp_path / "ours", [3, 5])
    assert count_samples(expand_urls(ours))[0] == 8
    theirs = write_img2dataset_shards(tmp_path / "i2d", [4, 2, 3])
    total, per_shard = count_samples(expand_urls(theirs))
    assert total == 9 and sorted(per_shard.values()) == [2, 3, 4]
    bare = write_img2dataset_shards(tmp_path / "bare", [4, 2], stats=False)
    assert count_samples(expand_urls(bare))[0] is None
    with pytest.raises(ShardError, match="train_num_samples"):
        _dm(bare).setup()
    assert _dm(bare, train_num_samples=6).batches_per_epoch == 1


def test_an_unfinished_download_of_ours_is_refused(tmp_path: Path) -> None:
    """Our crawler's shard stats carry a `pack` record; without manifest.json beside them the download
    did not finish (killed before or during its pack), with or without train_num_samples."""
    pattern = write_crawler_shards(tmp_path, [4, 4], manifest=False)
    for stats in tmp_path.glob("shard-*.stats.json"):
        data = json.loads(stats.read_text())
        stats.write_text(json.dumps({**data, "pack": {"parts_digest": "0" * 32, "samples_per_shard": 4}}))
    message = rf"the download into {tmp_path} did not finish \(no manifest.json\): rerun the same download"
    with pytest.raises(ShardError, match=message):
        count_samples(expand_urls(pattern))
    with pytest.raises(ShardError, match=message):
        _dm(pattern, train_num_samples=8).setup()
    # img2dataset's layout has no manifest by design and stays readable.
    theirs = write_img2dataset_shards(tmp_path / "i2d", [4, 2])
    assert count_samples(expand_urls(theirs))[0] == 6
    assert _dm(theirs, train_num_samples=6).batches_per_epoch == 1


def test_missing_shards(tmp_path: Path) -> None:
    pattern = write_crawler_shards(tmp_path, [4, 4, 4])
    with pytest.raises(ShardError, match=r"2 of 5 shards not found: .*shard-000003.tar.*brace range"):
        _dm(pattern.replace("000002", "000004")).setup()


def test_unreadable_paths(tmp_path: Path) -> None:
    write_crawler_shards(tmp_path, [4, 4])
    (tmp_path / "shard-000002.tar").mkdir()
    with pytest.raises(ShardError, match=r"cannot be read: .*shard-000002.tar \(not a regular file\)"):
        _dm(str(tmp_path / "shard-{000000..000002}.tar")).setup()


def test_manifest_that_disagrees_with_the_files(tmp_path: Path) -> None:
    pattern = write_crawler_shards(tmp_path, [4, 4, 4])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # A shard the manifest does not list.
    short = {"shards": manifest["shards"][:2], "num_samples": 8}
    (tmp_path / "manifest.json").write_text(json.dumps(short))
    with pytest.raises(ShardError, match=r"not listed in .*manifest\.json.*Regenerate"):
        _dm(pattern).setup()
    # Totals that do not add up.
    manifest["num_samples"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="num_samples=99 but its shards add up to 12"):
        _dm(pattern).setup()
    # Counts that cannot fit in the files (a manifest from another dataset).
    manifest["shards"][1]["num_samples"] = 100_000
    manifest["num_samples"] = 100_008
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-000001\.tar is .* bytes but .* claim 100000 samples"):
        _dm(pattern).setup()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="malformed"):
        _dm(pattern).setup()


def test_fewer_shards_than_ranks_times_workers(tmp_path: Path) -> None:
    pattern = write_crawler_shards(tmp_path, [4, 4, 4])
    with pytest.raises(
        ShardError, match=r"3 shard\(s\) but 2 rank\(s\) x 2 worker\(s\) = 4 readers.*resampled=True"
    ):
        _dm(pattern, num_workers=2, rank=1, world_size=2).setup()
    _dm(pattern, num_workers=1, rank=1, world_size=2).setup()  # 2 readers: fine
    _dm(pattern, num_workers=2, rank=1, world_size=2, resampled=True).setup()  # resampled: fine


def test_zero_samples_and_too_small_epochs(tmp_path: Path) -> None:
    empty = write_crawler_shards(tmp_path / "empty", [0, 0])
    with pytest.raises(ShardError, match="shards are empty"):
        _dm(empty).setup()
    # An empty crawl output names its real problem, not the shard count it also falls short of.
    with pytest.raises(ShardError, match="shards are empty"):
        _dm(write_crawler_shards(tmp_path / "one", [0]), num_workers=4).setup()
    small = write_crawler_shards(tmp_path / "small", [3, 2])
    with pytest.raises(ShardError, match=r"5 samples holds no full global batch of 8 samples"):
        _dm(small, rank=0, world_size=2).setup()


def test_batch_errors_name_global_batch_size_and_the_world(tmp_path: Path) -> None:
    """The training config sets global_batch_size; the data module gets its per-rank share as batch_size.
    An error about the batch names the setting the user has, with a value that works."""
    small = write_crawler_shards(tmp_path / "small", [3, 2])
    with pytest.raises(
        ShardError,
        match=r"5 samples holds no full global batch of 8 samples \(global_batch_size; 4 per rank x 2 "
        r"rank\(s\)\): lower global_batch_size to 4 or less, a multiple of 2 \(per rank, batch_size 2",
    ):
        _dm(small, rank=0, world_size=2).setup()
    with pytest.raises(
        ShardError, match=r"global batch of 8 samples \(global_batch_size; .* to 5 or less, or"
    ):
        _dm(small, batch_size=8).setup()
    assert _dm(small, rank=0, world_size=2, batch_size=2).batches_per_epoch == 1  # the suggested 4 works
    with pytest.raises(ConfigError, match=r"global_batch_size=100 does not divide over 8 processes .* "
                       r"multiple of 8, e.g. 96 or 104"):  # fmt: skip
        per_rank_batch_size(100, 8)
    with pytest.raises(ConfigError, match=r"global_batch_size=2 does not divide over 4 .* e.g. 4$"):
        per_rank_batch_size(2, 4)


def test_validation_shards_are_checked(tmp_path: Path) -> None:
    train = write_crawler_shards(tmp_path / "train", [8, 8])
    with pytest.raises(ShardError, match="validation shard"):
        _dm(train, val_shards=str(tmp_path / "val" / "shard-{000000..000001}.tar")).setup()


def test_a_folder_with_a_manifest_stands_for_its_shards(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"shards": [{"name": "shard-000000.tar", "num_samples": 3}, '
        '{"name": "shard-000001.tar", "num_samples": 2}], "num_samples": 5}'
    )
    assert expand_urls(str(tmp_path)) == [
        str(tmp_path / "shard-000000.tar"),
        str(tmp_path / "shard-000001.tar"),
    ]


def test_a_folder_of_img2dataset_shards_stands_for_its_tars(tmp_path: Path) -> None:
    """img2dataset's output folder (00000.tar, 00000.parquet, 00000_stats.json ...) given as it is."""
    folder = tmp_path / "mnist"
    tars = write_real_img2dataset_output(folder, [4, 2, 3])
    (folder / ".00003.tar").write_bytes(b"")  # a hidden leftover is not a shard
    assert expand_urls(str(folder)) == expand_urls(f"{folder}/") == list(map(str, tars))
    assert count_samples(expand_urls(str(folder))) == (9, {str(t): n for t, n in zip(tars, [4, 2, 3])})
    dm = _dm(str(folder), num_workers=2)
    assert dm.batches_per_epoch == 2  # 9 samples from the *_stats.json, batches of 4
    keys = [k for _, _, info in dm.train_dataloader() for k in info["keys"]]
    assert len(keys) == len(set(keys)) == 8 and all(k.isdigit() and len(k) == 9 for k in keys)


def test_a_folder_without_shards_says_what_it_holds(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(
        ShardError, match=r"holds no \.tar shards and no manifest\.json \(it holds 3 \.png files\)"
    ):
        expand_urls(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"empty holds no \.tar shards .*\(it is empty\)"):
        expand_urls(str(tmp_path / "empty"))


def _suggested(message: str) -> str:
    found = re.search(r"'([^']+)' names", message)
    assert found, message
    return found[1]


def test_a_pattern_that_misses_suggests_one_that_matches_the_files(tmp_path: Path) -> None:
    """The usual slip: our shard- names written for img2dataset's 00000.tar. The error's pattern expands to
    exactly the files in the folder; where no single pattern does, it says to pass the folder."""
    folder = tmp_path / "i2d"
    tars = write_real_img2dataset_output(folder, [4, 4, 4])
    with pytest.raises(ShardError, match="brace range") as error:
        _dm(f"{folder}/shard-{{000000..000002}}.tar").setup()
    assert expand_urls(_suggested(str(error.value))) == list(map(str, tars))
    ours = tmp_path / "ours"
    write_crawler_shards(ours, [4, 4])
    with pytest.raises(ShardError) as error:
        _dm(f"{ours}/shard-{{000000..000005}}.tar").setup()
    assert _suggested(str(error.value)) == f"{ours}/shard-{{000000..000001}}.tar"
    tars[1].unlink()  # a gap: no brace range names 00000.tar and 00002.tar alone
    with pytest.raises(
        ShardError, match=r"holds 2 \.tar files \(00000\.tar \.\.\. 00002\.tar\); pass the folder"
    ):
        _dm(f"{folder}/{{00000..00002}}.tar").setup()
    with pytest.raises(ShardError, match=rf"{tmp_path}/nowhere does not exist"):
        _dm(f"{tmp_path}/nowhere/{{00000..00002}}.tar").setup()


def test_a_file_that_is_no_tar_is_refused_in_one_line(tmp_path: Path) -> None:
    """A PNG (or any other file) given for the shards fails in setup with its name and what a shard is,
    not in a loader worker; so does it when train_num_samples skips the counting."""
    png = tmp_path / "digit.png"
    Image.new("RGB", (64, 64), "white").save(png)
    said = rf"{png} is not a tar archive \(it starts like a PNG image\): a shard is a WebDataset \.tar file"
    for kw in ({}, {"train_num_samples": 8}):
        with pytest.raises(ShardError, match=said):
            _dm(str(png), **kw).setup()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a tar\n" * 100)
    with pytest.raises(ShardError, match=r"notes\.txt is not a tar archive \(its first 512 bytes are no tar"):
        _dm(str(notes), train_num_samples=8).setup()
    # A stray file beside real shards: the error names them.
    pattern = write_crawler_shards(tmp_path / "shards", [4, 4])
    stray = tmp_path / "shards" / "cover.jpg"
    stray.write_bytes(jpeg_bytes(0))
    with pytest.raises(ShardError, match=r"JPEG image.*'.*shard-\{000000\.\.000001\}\.tar' names"):
        _dm([*expand_urls(pattern), str(stray)], train_num_samples=8).setup()
    # Not refused: a gzipped tar (the reader opens it) and a tar cut inside its first header (skipped and
    # counted by the reader).
    first = Path(expand_urls(pattern)[0])
    zipped = tmp_path / "shard.tar.gz"
    zipped.write_bytes(gzip.compress(first.read_bytes()))
    stub = tmp_path / "stub.tar"
    stub.write_bytes(first.read_bytes()[:100])
    check_readable([str(zipped), str(stub)])


def test_python_m_clip_train_refuses_a_png_in_one_line(tmp_path: Path) -> None:
    """The user's view of the same check: one line on stderr, no traceback."""
    png = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(png)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "clip_train", "data=webdataset", f"data.train_shards={png}",
               "model=vit_tiny", "data.num_workers=0", f"paths.root_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"error: {png} is not a tar archive (it starts like a PNG")
