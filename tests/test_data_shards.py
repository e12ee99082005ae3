"""Shard lists and bad input: every problem fails in setup(), before a worker starts, naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_support import ToyTokenizer, write_crawler_shards, write_img2dataset_shards

from clip_train.data import ShardError, WebDatasetDataModule, expand_urls
from clip_train.data.shards import count_samples, parse_sources


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
    with pytest.raises(ShardError, match=r"5 samples holds no full global batch of 8 \(batch_size 4 x 2"):
        _dm(small, rank=0, world_size=2).setup()


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


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(ShardError, match=r"without a manifest\.json"):
        expand_urls(str(tmp_path))
