"""WebDatasetDataModule: batches, epochs, splitting over ranks and workers, mixing, and exact resume."""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from data_support import ToyTokenizer, cut_short, tar_keys, write_crawler_shards, write_img2dataset_shards

from clip_train.data import ShardError, WebDatasetDataModule


def _dm(shards, **kw) -> WebDatasetDataModule:
    kw = {
        "batch_size": 4,
        "num_workers": 0,
        "image_size": 32,
        "tokenizer": ToyTokenizer(),
        "shuffle_buffer": 6,
        **kw,
    }
    return WebDatasetDataModule(shards, **kw)


def _epoch(dm: WebDatasetDataModule) -> list[list[str]]:
    return [info["keys"] for _, _, info in dm.train_dataloader()]


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> str:
    """4 shards x 8 samples."""
    return write_crawler_shards(tmp_path_factory.mktemp("even"), [8, 8, 8, 8])


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """6 shards of very different sizes, with corrupt images scattered through them (63 samples)."""
    corrupt = {"0000x00002", "0002x00000", "0002x00007", "0004x00001"}
    return write_crawler_shards(tmp_path_factory.mktemp("uneven"), [14, 3, 20, 5, 9, 12], corrupt=corrupt)


def test_batches_have_the_documented_shapes(even: str) -> None:
    dm = _dm(even, batch_size=5, context_length=16, tokenizer=ToyTokenizer(16))
    assert dm.batches_per_epoch == 6  # 32 // 5
    loader = dm.train_dataloader()
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    images, tokens, info = batches[0]
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert len(info["keys"]) == 5 and info["epoch"] == 0 and info["index"] == 0
    assert -2.0 < images.mean() < 2.5 and images.std() > 0.1  # normalised, not 0..255


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_reads_every_sample_once_in_a_seeded_order(even: str, num_workers: int) -> None:
    dm = _dm(even, num_workers=num_workers)
    first, second = _epoch(dm), _epoch(dm)
    for epoch in (first, second):
        keys = [k for batch in epoch for k in batch]
        assert len(keys) == 32 and len(set(keys)) == 32
    assert first != second  # a new shuffle every epoch
    assert _epoch(_dm(even, num_workers=num_workers)) == first  # same seed, same order
    assert _epoch(_dm(even, num_workers=num_workers, seed=1)) != first


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    # The first sample of every shard is corrupt: 28 good samples make exactly 7 batches of 4.
    pattern = write_crawler_shards(tmp_path, [8, 8, 8, 8], corrupt={f"000{s}x00000" for s in range(4)})
    dm = _dm(pattern, train_num_samples=28, shuffle_buffer=1)
    keys = [k for batch in _epoch(dm) for k in batch]
    assert sorted(keys) == sorted(f"000{s}x{i:05d}" for s in range(4) for i in range(1, 8))
    assert dm.corrupt_samples == 4
    _epoch(dm)
    assert dm.corrupt_samples == 8  # a running count over epochs


def test_a_truncated_shard_is_warned_about_and_the_epoch_keeps_its_length(tmp_path: Path) -> None:
    pattern = write_crawler_shards(tmp_path, [8, 8, 8, 8])
    damaged = tmp_path / "shard-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a download cut short
    dm = _dm(pattern)
    with pytest.warns(UserWarning, match=r"skipping the rest of shard .*shard-000002\.tar"):
        epoch = _epoch(dm)
    assert len(epoch) == dm.batches_per_epoch == 8  # the reader refills from its other shards
    keys = {k for batch in epoch for k in batch}
    assert {k for k in keys if k.startswith("0002x")} and "0002x00007" not in keys


@pytest.mark.parametrize(
    ("layout", "inside", "kept"),
    [("crawler", "data", 4), ("crawler", "header", 4), ("img2dataset", "data", 0)],
)
def test_the_samples_a_truncated_shard_lost_are_counted(tmp_path: Path, layout: str, inside: str, kept: int):
    """A shard cut inside a member's data (tarfile raises) or inside a header (tarfile ends quietly) loses
    its samples from the cut on; its manifest's or stats' count says how many, and they join the skipped
    count. The epoch is the intact samples, so each shard is read once per epoch."""
    write = write_crawler_shards if layout == "crawler" else write_img2dataset_shards
    pattern = write(tmp_path, [8, 8, 8, 8])
    damaged = sorted(tmp_path.glob("*.tar"))[2]
    lost = tar_keys(damaged)[kept:]
    intact = {k for tar in tmp_path.glob("*.tar") for k in tar_keys(tar)} - set(lost)
    cut_short(damaged, lost[0], inside)
    # A cut shard is smaller than its count allows; that is damage, not a manifest of other files.
    assert _dm(pattern).batches_per_epoch == 8
    dm = _dm(pattern, train_num_samples=24 + kept)
    said = (
        rf"skipping the rest of shard .*{damaged.name}: ReadError: .*; {8 - kept} of its 8 samples skipped"
        if inside == "data"
        else rf"shard .*{damaged.name} ended after {kept} of its 8 samples .*; {8 - kept} samples skipped"
    )
    with pytest.warns(UserWarning, match=said):
        keys = [k for batch in _epoch(dm) for k in batch]
    assert sorted(keys) == sorted(intact) and not set(lost) & set(keys)
    assert dm.corrupt_samples == 8 - kept
    with pytest.warns(UserWarning, match=said):
        _epoch(dm)
    assert dm.corrupt_samples == 2 * (8 - kept)  # a running count over epochs, like undecodable samples


def test_resume_after_a_truncated_shard_counts_its_losses_once(tmp_path: Path) -> None:
    """A resumed reader replays its shards up to the saved position; the losses it meets again on the way
    are already in the saved count."""
    pattern = write_crawler_shards(tmp_path, [8, 8, 8, 8])
    cut_short(tmp_path / "shard-000002.tar", "0002x00004", inside="header")  # no partial sample to decode
    kw = {"num_workers": 2, "batch_size": 3, "seed": 3}
    warnings.simplefilter("ignore", UserWarning)  # pytest restores the filters after the test
    dm = _dm(pattern, **kw)
    counts = []
    for _, _, info in dm.train_dataloader():
        counts.append((info["keys"], dm.corrupt_samples))
    assert dm.corrupt_samples > 0
    stop = next(i for i, (_, count) in enumerate(counts) if count) + 1
    assert stop < len(counts) == dm.batches_per_epoch
    first = _dm(pattern, **kw)
    head = _run(first, stop=stop)
    assert first.corrupt_samples == counts[stop - 1][1] > 0
    resumed = _dm(pattern, **kw)
    resumed.load_state_dict(first.state_dict())
    tail = _run(resumed)
    assert [k for k, _ in head + tail] == [k for k, _ in counts]
    assert resumed.corrupt_samples == dm.corrupt_samples


def test_the_trainer_logs_the_samples_a_truncated_shard_lost(tmp_path: Path) -> None:
    """Through the training program: a folder of img2dataset shards, one cut short, and the logged
    train/corrupt_samples_skipped holds what it lost."""
    from hydra import compose, initialize_config_dir

    from clip_train.train import CONFIG_DIR, train
    from clip_train.training.loggers import read_metrics

    write_img2dataset_shards(tmp_path / "i2d", [8, 8, 8, 8], image_size=40)
    cut_short(tmp_path / "i2d" / "00002.tar", tar_keys(tmp_path / "i2d" / "00002.tar")[5])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=webdataset", f"data.train_shards={tmp_path / 'i2d'}", "data.num_workers=0",
                "data.train_num_samples=24", "model=vit_tiny", "global_batch_size=8", "trainer.precision=32",
                f"paths.run_dir={tmp_path}/run", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                "logger.0.flush_logs_every_n_steps=1", "~callbacks.progress",
            ],
        )  # fmt: skip
    with pytest.warns(UserWarning, match=r"00002\.tar: ReadError: .*; 3 of its 8 samples skipped"):
        train(cfg)
    metrics = read_metrics(tmp_path / "run/logs/metrics.csv")
    logged = [m for _, m in sorted(metrics.items()) if "train/loss" in m]
    # The shuffle buffer takes in the whole pass (the damaged shard included) before the first batch.
    assert [m["train/corrupt_samples_skipped"] for m in logged] == [3.0, 3.0, 3.0]


@pytest.mark.timeout(60)  # without the limit the reader would cycle through its shard for ever
def test_shards_of_anything_but_images_stop_the_run_with_an_error(tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(tmp_path / "notes-000000.tar", "w") as tar:
        for i in range(1001):  # one more than MAX_CONSECUTIVE_CORRUPT
            body = f"note {i}".encode()
            member = tarfile.TarInfo(f"{i:05d}.jpg")
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    dm = _dm(str(tmp_path / "notes-000000.tar"), train_num_samples=8)
    with pytest.raises(RuntimeError, match=r"1000 undecodable samples in a row .* not image-text WebDataset"):
        _epoch(dm)


def test_pipe_and_file_urls_read_the_same_samples(even: str, tmp_path: Path) -> None:
    paths = sorted(Path(even.split("{")[0]).parent.glob("shard-*.tar"))
    with pytest.raises(ShardError, match="train_num_samples"):  # no manifest to count a pipe's samples
        _dm([f"pipe:cat {p}" for p in paths]).setup()
    plain = _epoch(_dm(even))
    assert _epoch(_dm([f"pipe:cat {p}" for p in paths], train_num_samples=32)) == plain
    assert _epoch(_dm([f"file://{p}" for p in paths])) == plain
    with pytest.raises(ShardError, match="1 of 4 shards not found"):
        _dm([f"file://{p}" for p in paths[:3]] + [f"file://{tmp_path}/gone.tar"]).setup()


@pytest.mark.parametrize(("num_workers", "resampled"), [(0, False), (2, False), (2, True)])
def test_ranks_get_disjoint_shards_and_equal_batch_counts(
    uneven: str, num_workers: int, resampled: bool
) -> None:
    per_rank = []
    for rank in range(2):
        dm = _dm(uneven, rank=rank, world_size=2, num_workers=num_workers, batch_size=3, resampled=resampled)
        assert dm.batches_per_epoch == 63 // 6
        batches = _epoch(dm)
        assert len(batches) == 10 and all(len(b) == 3 for b in batches)
        per_rank.append({k.split("x")[0] for b in batches for k in b})  # shard ids each rank read
    if not resampled:
        assert per_rank[0].isdisjoint(per_rank[1])


def test_img2dataset_layout(tmp_path: Path) -> None:
    pattern = write_img2dataset_shards(tmp_path, [8, 8])
    dm = _dm(pattern, num_workers=2)
    keys = [k for batch in _epoch(dm) for k in batch]
    assert dm.batches_per_epoch == 4 and len(set(keys)) == 16
    assert all(len(k) == 9 and k.isdigit() for k in keys)


def test_sources_are_mixed_by_weight(tmp_path: Path) -> None:
    a = write_crawler_shards(tmp_path / "a", [8, 8], key_prefix="a")
    b = write_crawler_shards(tmp_path / "b", [8, 8], key_prefix="b")
    sources = [{"urls": a, "weight": 3.0}, {"urls": b, "weight": 1.0}]
    dm = _dm(sources, train_num_samples=240, batch_size=8)
    counts = collections.Counter(k[0] for batch in _epoch(dm) for k in batch)
    assert counts["a"] + counts["b"] == 240
    assert 0.65 < counts["a"] / 240 < 0.85


def _run(dm: WebDatasetDataModule, stop: int | None = None) -> list[tuple[list[str], float]]:
    """Batches (keys, image checksum) until `stop` batches have been taken."""
    out = []
    for images, _, info in dm.train_dataloader():
        out.append((info["keys"], float(images.double().sum())))
        if stop is not None and len(out) == stop:
            break
    return out


@pytest.mark.parametrize(("num_workers", "stop"), [(0, 4), (2, 3), (2, 8), (2, 21)])
def test_resume_continues_exactly_where_it_stopped(uneven: str, num_workers: int, stop: int) -> None:
    kw = {"num_workers": num_workers, "batch_size": 3, "seed": 5}
    dm = _dm(uneven, **kw)
    uninterrupted = _run(dm) + _run(dm)  # two full epochs
    assert len(uninterrupted) == 2 * dm.batches_per_epoch == 42
    first = _dm(uneven, **kw)
    head = _run(first, stop=stop)
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["seed"]) == (0, stop, 5)
    resumed = _dm(uneven, **kw)
    resumed.load_state_dict(state)
    tail = _run(resumed)
    if stop < 21:  # the rest of epoch 0 ...
        tail += _run(resumed)  # ... then epoch 1
    assert [k for k, _ in head + tail] == [k for k, _ in uninterrupted]
    assert [c for _, c in head + tail] == pytest.approx([c for _, c in uninterrupted])  # same crops too
    assert resumed.corrupt_samples == dm.corrupt_samples > 0


def test_workers_started_by_a_forkserver_give_the_same_batches(uneven: str) -> None:
    """Everything a worker needs crosses a pickle: same batches, crops, position and corrupt count."""
    kw = {"num_workers": 2, "batch_size": 3, "seed": 5}
    forked = _dm(uneven, **kw)
    expected = _run(forked)
    started = _dm(uneven, worker_start_method="forkserver", **kw)
    assert started._new_epoch_loader().multiprocessing_context.get_start_method() == "forkserver"
    head = _run(started, stop=5)
    resumed = _dm(uneven, worker_start_method="forkserver", **kw)
    resumed.load_state_dict(started.state_dict())
    actual = head + _run(resumed)
    assert [k for k, _ in actual] == [k for k, _ in expected]
    assert [c for _, c in actual] == pytest.approx([c for _, c in expected])
    assert resumed.corrupt_samples == forked.corrupt_samples > 0


def test_an_unknown_worker_start_method_is_refused(even: str) -> None:
    with pytest.raises(ValueError, match="worker_start_method='forking' is not a start method"):
        _dm(even, worker_start_method="forking")


def test_resume_on_another_layout_warns_and_keeps_the_batch_count(uneven: str) -> None:
    first = _dm(uneven, num_workers=0, batch_size=3)
    _run(first, stop=4)
    resumed = _dm(uneven, num_workers=2, batch_size=3)
    resumed.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match="approximated"):
        rest = _run(resumed)
    assert len(rest) == 21 - 4


def test_validation_reads_each_sample_once_across_ranks(even: str) -> None:
    seen = []
    for rank in range(2):
        dm = _dm(even, val_shards=even, rank=rank, world_size=2, num_workers=2, batch_size=5)
        for images, tokens, info in dm.val_dataloader():
            assert images.shape[1:] == (3, 32, 32) and tokens.shape[0] == images.shape[0]
            seen.extend(info["keys"])
    assert len(seen) == 32 and len(set(seen)) == 32


def test_default_tokenizer_is_clips(even: str) -> None:
    dm = WebDatasetDataModule(even, batch_size=4, num_workers=0, image_size=32, shuffle_buffer=4)
    _, tokens, _ = next(iter(dm.train_dataloader()))
    assert tokens.shape == (4, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all()  # <start_of_text>


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        images, _, info = batch
        self.seen.append(info["keys"])
        return (self.weight * images.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, max_steps: int, ckpt_in: Path | None = None, ckpt_out: Path | None = None) -> list[list[str]]:
    module = _Recorder()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return module.seen


def test_lightning_checkpoint_holds_the_data_position(uneven: str, tmp_path: Path) -> None:
    # Lightning fetches one batch ahead; the position must still be the batches actually trained on.
    kw = {"num_workers": 2, "batch_size": 3}
    uninterrupted = _fit(_dm(uneven, **kw), max_steps=25)
    head = _fit(_dm(uneven, **kw), max_steps=5, ckpt_out=tmp_path / "mid.ckpt")
    tail = _fit(_dm(uneven, **kw), max_steps=25, ckpt_in=tmp_path / "mid.ckpt")
    assert len(uninterrupted) == 25
    assert head + tail == uninterrupted
