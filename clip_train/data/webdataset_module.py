"""WebDataset shards -> (images, tokens, info) batches for CLIP training, with an exact data position.

How an epoch is laid out (the reason every rank gets the same number of batches and resume is exact):

* An epoch has N samples (the manifest, img2dataset's stats, or `train_num_samples`). Each rank produces
  exactly `batches_per_epoch = N // (batch_size * world_size)` batches; DDP never waits on a rank that ran
  out of data.
* A rank's batch i comes from its logical worker i % W (W = max(num_workers, 1)), so each of the
  R x W readers has a fixed quota of batches. Reader g = rank * W + worker reads, per source, the shards
  at positions g, g + RW, g + 2RW, ... of that source's shard list shuffled with (seed, epoch): readers
  never share a shard in the first pass. A reader whose shards run dry before its quota re-reads its own
  shards in a fresh (seed, epoch, reader, cycle) order; in resampled mode it draws shards with
  replacement from the whole source instead.
* Several sources are mixed per sample by weight with a (seed, epoch, reader) generator; a shuffle buffer
  with its own generator shuffles samples (still encoded) within each reader.
* Decoding happens after the shuffle; a sample whose image or caption does not decode is skipped and
  counted, and the next one takes its place in the batch. A shard that breaks off (truncated, damaged)
  is read up to the break; the samples its manifest or stats count promised beyond that are counted as
  skipped too. Each batch carries its reader's count of raw samples read so far, so the position survives
  corrupt samples: to resume, a reader replays its raw stream (tar reads only, no decoding) to that count
  and carries on with identical batches.
* Random crops use a generator seeded by (seed, epoch, reader, sample number): augmentations resume too.

A batch is `(images, tokens, info)`: images float32 (B, 3, H, W) normalised with CLIP's mean/std, tokens
int64 (B, context_length), and `info` a dict with "keys" (the samples' `__key__`s) plus position fields
("epoch", "index", "worker", "samples_read", "corrupt") that the data module uses for its state.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_train.data.shards import (
    ShardError,
    ShardSource,
    check_finished,
    check_readable,
    count_samples,
    parse_sources,
)
from clip_train.data.transforms import (
    RandomResizedCrop,
    ResizeCenterCrop,
    decode_image,
    normalize_batch,
    stack_uint8,
)
from clip_train.models.clip import check_token_values

IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp", "png")
# A reader that meets this many undecodable samples in a row stops with an error instead of spinning.
MAX_CONSECUTIVE_CORRUPT = 1000

# Marks the end of a reader's pass over its shards (see _TrainStream._raw_stream).
_END_OF_PASS: Any = object()

Tokenizer = Callable[[list[str]], torch.Tensor]


def _identity(x: Any) -> Any:
    return x


def default_num_workers() -> int:
    """Loader workers per rank when none are given: 4, or the CPUs this process may run on if fewer (more
    workers than those only compete for them, and PyTorch's DataLoader warns about it)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


def _default_tokenizer(context_length: int) -> Tokenizer:
    try:
        from clip_train.tokenizer import Tokenizer as ClipTokenizer
    except ImportError as e:
        raise ImportError(
            "WebDatasetDataModule(tokenizer=None) builds clip_train.tokenizer.Tokenizer, which could not be "
            f"imported ({e}); pass tokenizer=<callable list[str] -> LongTensor (B, {context_length})>"
        ) from e
    try:
        return ClipTokenizer(context_length=context_length)
    except TypeError:
        return ClipTokenizer()


def _seeded(*parts: object) -> random.Random:
    # String seeds go through SHA-512 in `random`, so the stream is the same in every process and is
    # not affected by PYTHONHASHSEED.
    return random.Random("-".join(str(p) for p in parts))


def _read_shard(url: str, expected: int | None = None) -> Generator[dict[str, Any], None, int]:
    """Samples ({"__key__", "__url__", ext: bytes}) of one tar, members grouped by key as WebDataset does
    (key = path up to the first dot of the file name).

    A damaged tar is read up to the break and warned about; the sample being read when it broke is dropped
    (its members may be cut). Returns how many of the `expected` samples (the manifest's or stats' count;
    None: unknown) were not yielded, so that the caller can count them as skipped."""
    sample: dict[str, Any] = {}
    yielded = 0
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("__"):
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if sample and sample["__key__"] != key:
                    yielded += 1
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = tar.extractfile(member).read()
    except Exception as e:  # a truncated or unreadable tar must not kill the epoch
        lost = max(0, expected - yielded) if expected is not None else 0
        counted = (
            f"{lost} of its {expected} samples skipped"
            if expected is not None
            else f"{yielded} samples read before the break (how many it held is unknown, so the rest are "
            "not counted)"
        )
        warnings.warn(f"skipping the rest of shard {url}: {type(e).__name__}: {e}; {counted}", stacklevel=2)
        return lost
    if sample:
        yielded += 1
        yield sample
    # tarfile ends a stream quietly when it is cut inside a member's header: only the count tells.
    if expected is not None and yielded < expected:
        warnings.warn(
            f"shard {url} ended after {yielded} of its {expected} samples (cut short?); "
            f"{expected - yielded} samples skipped",
            stacklevel=2,
        )
        return expected - yielded
    return 0


def _decode_sample(sample: dict[str, Any], transform, decode_size: int, rng: random.Random):
    """-> (uint8 array (H, W, 3), caption str). Raises on a missing or undecodable image or caption."""
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8").strip()
    else:
        import json

        meta = json.loads(sample["json"])
        caption = str(meta.get("caption") or meta.get("text") or "").strip()
    if not caption:
        raise ValueError(f"sample {sample.get('__key__')} has an empty caption")
    image = decode_image(data, decode_size)
    return transform.crop(image, rng), caption


def _worker_context(method: str | None) -> multiprocessing.context.BaseContext | None:
    """The start method's context. A forkserver imports this module (torch, PIL, webdataset, the tokenizer)
    once, before it forks any worker: otherwise every worker of every epoch imports them itself, seconds
    each. Preloading takes effect when the server starts, i.e. at the first forkserver loader."""
    if method is None:
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


@dataclass
class _Losses:
    """Samples that damaged shards lost in one reader's stream: they never reach the decoder, so they
    are counted where the shards are read."""

    count: int = 0


def _no_full_batch(num_samples: int, batch_size: int, world_size: int) -> str:
    """The message for an epoch too small for one global batch. The training config sets the batch as
    global_batch_size (this module's batch_size is its share per rank), so the fix is named in its terms."""
    global_batch = batch_size * world_size
    problem = (
        f"an epoch of {num_samples} samples holds no full global batch of {global_batch} samples "
        f"(global_batch_size; {batch_size} per rank x {world_size} rank(s)): "
    )
    if num_samples == 0:
        return problem + "the shards are empty or their manifest says 0 samples; check the crawl output."
    fits = num_samples // world_size * world_size  # the largest global batch that divides over the ranks
    if fits == 0:
        return problem + f"{world_size} ranks need one sample each at least; add data (train_num_samples)."
    shares = (
        f", a multiple of {world_size} (per rank, batch_size {fits // world_size} or less)"
        if world_size > 1
        else ""
    )
    return problem + f"lower global_batch_size to {fits} or less{shares}, or add data (train_num_samples)."


def _quota(total: int, workers: int, worker: int) -> int:
    """How many of the indices 0..total-1 are congruent to `worker` modulo `workers`."""
    return max(0, (total - worker + workers - 1) // workers)


class _TrainStream(IterableDataset):
    """One rank's training epoch; see the module docstring. Built afresh for every epoch."""

    def __init__(
        self,
        sources: list[ShardSource],
        *,
        batch_size: int,
        batches_per_epoch: int,
        rank: int,
        world_size: int,
        workers: int,
        epoch: int,
        seed: int,
        resampled: bool,
        shuffle_buffer: int,
        transform: RandomResizedCrop,
        tokenizer: Tokenizer,
        start_index: int = 0,
        start_samples_read: Sequence[int] | None = None,
        start_corrupt: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.epoch, self.seed = epoch, seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.tokenizer = tokenizer
        self.start_index = start_index
        self.start_samples_read = start_samples_read
        self.start_corrupt = start_corrupt

    @staticmethod
    def _shard(url: str, source: ShardSource, losses: _Losses) -> Iterator[dict]:
        """The samples of one shard; the ones it was counted to hold but did not give go to `losses`."""
        # Not `losses.count += yield from ...`: that reads the count before the shard and writes it back
        # after, undoing a reset made meanwhile (the resume replay's).
        lost = yield from _read_shard(url, source.shard_counts.get(url))
        losses.count += lost

    def _source_stream(self, s: int, source: ShardSource, reader: int, losses: _Losses) -> Iterator[dict]:
        """Endless samples of source s for this reader within this epoch."""
        readers = self.world_size * self.workers
        if self.resampled:
            rng = _seeded("resample", self.seed, self.epoch, s, reader)
            empty_in_a_row = 0
            while True:
                got = 0
                for sample in self._shard(rng.choice(source.urls), source, losses):
                    got += 1
                    yield sample
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row > 10 * len(source.urls):
                    raise RuntimeError(f"source {source.name!r}: every shard drawn was empty or unreadable")
        order = list(source.urls)
        _seeded("shards", self.seed, self.epoch, s).shuffle(order)
        mine = order[reader::readers]
        cycle = 0
        while True:
            got = 0
            for url in mine:
                for sample in self._shard(url, source, losses):
                    got += 1
                    yield sample
            if not got:
                raise RuntimeError(
                    f"reader {reader} (rank {self.rank}) of source {source.name!r}: its shards {mine[:3]}... "
                    "hold no readable samples"
                )
            yield _END_OF_PASS
            cycle += 1
            mine = list(mine)
            _seeded("recycle", self.seed, self.epoch, s, reader, cycle).shuffle(mine)

    def _raw_stream(self, reader: int, losses: _Losses) -> Iterator[dict]:
        """Endless, shuffled, still-encoded samples of this reader; lost samples are added to `losses`."""
        streams = [self._source_stream(s, src, reader, losses) for s, src in enumerate(self.sources)]
        mixed = streams[0] if len(streams) == 1 else self._mix(streams, reader)
        rng = _seeded("shuffle", self.seed, self.epoch, reader)
        size = max(1, self.shuffle_buffer)
        buffer: list[dict] = []
        for sample in mixed:
            if sample is _END_OF_PASS:
                # Empty the buffer before the shards are re-read, so that a pass yields every sample once.
                rng.shuffle(buffer)
                yield from buffer
                buffer = []
                continue
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = rng.randrange(size)
            buffer[j], sample = sample, buffer[j]
            yield sample

    def _mix(self, streams: list[Iterator[dict]], reader: int) -> Iterator[dict]:
        weights = [src.weight for src in self.sources]
        pick = _seeded("mix", self.seed, self.epoch, reader)
        index = range(len(streams))
        while True:
            sample = next(streams[pick.choices(index, weights)[0]])
            if sample is not _END_OF_PASS:  # passes of different sources overlap; nothing to flush
                yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        slot, slots = (info.id, info.num_workers) if info is not None else (0, 1)
        in_worker = info is not None
        if slots != self.workers:
            raise RuntimeError(f"stream built for {self.workers} workers runs in {slots}")
        W, k, B = self.workers, self.start_index, self.batches_per_epoch
        # Rotate so the DataLoader's round robin (which always starts at its worker 0) emits batch k first.
        worker = (slot + k) % W
        reader = self.rank * W + worker
        done, quota = _quota(k, W, worker), _quota(B, W, worker)
        if done >= quota:
            return
        if self.start_samples_read is not None:
            skip, corrupt = self.start_samples_read[worker], self.start_corrupt[worker]
        else:  # position known only in batches (resumed on another layout): approximate by batches.
            skip, corrupt = done * self.batch_size, 0
        losses = _Losses()
        stream = self._raw_stream(reader, losses)
        for _ in range(skip):
            next(stream)
        # The replay reads the same shards as the run that saved the position, and that run's count (in
        # `corrupt`) already holds the samples they lost up to here.
        losses.count = 0
        read = skip
        decode_size = self.transform.decode_size
        for j in range(done, quota):
            images, captions, keys = [], [], []
            corrupt_in_a_row = 0
            while len(images) < self.batch_size:
                sample = next(stream)
                read += 1
                rng = _seeded("augment", self.seed, self.epoch, reader, read)
                try:
                    image, caption = _decode_sample(sample, self.transform, decode_size, rng)
                except Exception:  # skip-and-count: any decode failure drops the sample
                    corrupt += 1
                    corrupt_in_a_row += 1
                    if corrupt_in_a_row >= MAX_CONSECUTIVE_CORRUPT:
                        raise RuntimeError(
                            f"{corrupt_in_a_row} undecodable samples in a row (last from "
                            f"{sample.get('__url__')}): the shards are not image-text WebDataset shards"
                        ) from None
                    continue
                corrupt_in_a_row = 0
                images.append(image)
                captions.append(caption)
                keys.append(sample["__key__"])
            tokens = self.tokenizer(captions)
            text_lengths = _checked_text_lengths(tokens, self.tokenizer, keys)
            pixels = stack_uint8(images)
            batch = torch.empty(len(images), 3, *pixels.shape[1:3], dtype=torch.float32)
            if in_worker:  # filled in shared memory, so sending it to the main process copies nothing
                batch.share_memory_()
            batch_info = {
                "keys": keys,
                "epoch": self.epoch,
                "index": worker + j * W,
                "worker": worker,
                "samples_read": read,
                "corrupt": corrupt + losses.count,
                "text_lengths": text_lengths,
            }
            yield normalize_batch(pixels, out=batch), tokens, batch_info


def _checked_text_lengths(tokens: torch.Tensor, tokenizer: Tokenizer, keys: list[str]) -> list[int] | None:
    """Each caption's length up to and including its end-of-text token, as plain integers (the training
    step groups captions by length without a device synchronisation), after checking the token values
    here, once per batch in the loader, instead of in the model at every step; a bad one names its sample.
    None for a tokenizer that does not say its end-of-text id (`eot_token_id`): the step checks instead."""
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None:
        return None
    vocab_size = getattr(tokenizer, "vocab_size", None)
    try:
        check_token_values(tokens, vocab_size if vocab_size is not None else 2**62, eot, keys)
    except ValueError as error:
        raise ValueError(f"the tokenizer's output: {error}") from None
    return ((tokens == eot).int().argmax(dim=1) + 1).tolist()


class _EvalStream(IterableDataset):
    """Every sample of this rank's evaluation shards once, in order, resize + centre crop; the last batch
    of each worker may be short."""

    def __init__(
        self, urls: list[str], *, batch_size: int, transform: ResizeCenterCrop, tokenizer: Tokenizer
    ) -> None:
        super().__init__()
        self.urls, self.batch_size, self.transform, self.tokenizer = urls, batch_size, transform, tokenizer

    def __iter__(self):
        info = get_worker_info()
        slot, slots = (info.id, info.num_workers) if info is not None else (0, 1)
        images, captions, keys = [], [], []
        for url in self.urls[slot::slots]:
            for sample in _read_shard(url):
                try:
                    image, caption = _decode_sample(sample, self.transform, self.transform.size, None)
                except Exception:  # an unreadable sample is left out
                    continue
                images.append(image)
                captions.append(caption)
                keys.append(sample["__key__"])
                if len(images) == self.batch_size:
                    yield normalize_batch(stack_uint8(images)), self.tokenizer(captions), {"keys": keys}
                    images, captions, keys = [], [], []
        if images:
            yield normalize_batch(stack_uint8(images)), self.tokenizer(captions), {"keys": keys}


class _EpochLoader:
    """The train 'dataloader': each `iter()` continues the data module's position (the rest of the current
    epoch, or the next epoch when it is complete). `len()` is the full epoch in batches."""

    def __init__(self, datamodule: WebDatasetDataModule) -> None:
        self.datamodule = datamodule

    def __len__(self) -> int:
        return self.datamodule.batches_per_epoch

    def __iter__(self):
        dm = self.datamodule
        # Outside a Trainer the caller consumes batches as they are yielded; inside one, Lightning fetches a
        # batch ahead, so the position is advanced by the on_before_batch_transfer hook instead.
        track_here = dm.trainer is None
        for batch in dm._new_epoch_loader():
            if track_here:
                dm._advance(batch[2])
            yield batch


class WebDatasetDataModule(pl.LightningDataModule):
    """CLIP training data from WebDataset shards (our crawler's layout or img2dataset's).

    train_shards: a brace pattern ("data/shard-{000000..000099}.tar"), a folder of shards (the ones its
        manifest.json lists, else all its *.tar, as img2dataset writes them), a list of these, or a list of
        {"urls": pattern, "weight": w} dicts to mix sources by weight (per sample).
    batch_size: per rank. image_size: crop side in pixels. context_length: tokens per caption.
    num_workers: loader worker processes per rank (0: in the main process); None: `default_num_workers()`.
        The sample order depends on it (see the module docstring): give it explicitly for runs that must
        match across machines with different CPU counts.
    tokenizer: callable list[str] -> LongTensor (B, context_length); None builds clip_train's CLIP tokenizer.
    train_num_samples: samples per epoch; None reads the shards' manifest.json (or img2dataset *_stats.json).
    seed: shuffling, mixing, resampling and augmentation all derive from (seed, epoch).
    resampled: draw shards with replacement (no need for more shards than ranks x workers).
    shuffle_buffer: samples per reader in the shuffle buffer (encoded bytes, ~30 KB each at 256 px).
    rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
    worker_start_method: how loader workers start: None (the platform's default, "fork" on Linux),
        "forkserver" or "spawn". A worker forked from a process that already runs threads (NCCL, DeepSpeed,
        OpenMP) can inherit a lock held by one of them and hang; the other two start clean processes.
        "forkserver" adds this module to the process-wide forkserver preload list, so its server imports
        torch and the rest once (seconds, at the first epoch) and each epoch's workers start in a fraction
        of a second; "spawn" imports them in every worker of every epoch.

    Batches are (images float32 (B, 3, H, W), tokens int64 (B, context_length), info dict with "keys");
    see the module docstring. `corrupt_samples` is the running count of skipped samples: undecodable ones
    and those that damaged shards lost (counted from their manifest or stats count).
    `state_dict()` / `load_state_dict()` hold the data position (epoch, batches consumed, seed, and each
    reader's raw sample count); after loading, the next batches are those an uninterrupted run would have
    produced (same world size and num_workers; otherwise the position is approximated and a warning says so).
    """

    def __init__(
        self,
        train_shards: str | list[str] | list[dict],
        val_shards: str | list[str] | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        image_size: int = 224,
        tokenizer: Tokenizer | None = None,
        context_length: int = 77,
        train_num_samples: int | None = None,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        worker_start_method: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is None:
            num_workers = default_num_workers()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if train_num_samples is not None and train_num_samples < 0:
            raise ValueError(f"train_num_samples must be >= 0, got {train_num_samples}")
        methods = multiprocessing.get_all_start_methods()
        if worker_start_method is not None and worker_start_method not in methods:
            raise ValueError(
                f"worker_start_method={worker_start_method!r} is not a start method this platform has; "
                f"use one of {methods}, or null for the default"
            )
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.train_num_samples = train_num_samples
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.crop_scale = tuple(crop_scale)
        self._rank_arg, self._world_size_arg = rank, world_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.worker_start_method = worker_start_method
        self._ready = False
        self._pending_state: dict | None = None
        self._reset_position(epoch=0)
        self._corrupt_before = 0

    # ---------------------------------------------------------------- set-up and validation
    @property
    def workers(self) -> int:
        """Readers per rank: num_workers, or 1 when loading in the main process."""
        return max(1, self.num_workers)

    def setup(self, stage: str | None = None) -> None:
        """Resolve rank/world size, expand and check the shards, count the epoch. Raises ShardError (a
        ValueError) naming the problem and the fix; nothing is read from the tars here."""
        if self._ready:
            return
        self.rank, self.world_size = self._resolve_rank()
        self.sources = parse_sources(self.train_shards)
        for src in self.sources:
            check_readable(src.urls)
        if self.train_num_samples is not None:
            for src in self.sources:
                # An unfinished download is refused whatever the epoch size: a half-packed output mixes
                # shards of two packs.
                check_finished(src.urls)
                try:
                    # Per-shard counts, where there are any, only serve to count what a damaged shard
                    # loses; a run that states its epoch size does not need them to agree.
                    src.shard_counts = count_samples(src.urls)[1]
                except ShardError:
                    src.shard_counts = {}
            self.num_samples = self.train_num_samples
        else:
            total = 0
            for src in self.sources:
                n, counts = count_samples(src.urls)
                if n is None:
                    unknown = [u for u in src.urls if u not in counts]
                    raise ShardError(
                        f"cannot tell how many samples {src.name!r} holds: {len(unknown)} of its "
                        f"{len(src.urls)} shards (e.g. {unknown[0]}) have no manifest.json beside them and "
                        "no *_stats.json with 'successes'/'num_samples' (img2dataset writes one when a "
                        "shard is complete). Pass train_num_samples=<samples per epoch>."
                    )
                src.num_samples, src.shard_counts = n, counts
                total += n
            self.num_samples = total
        # Empty shards first: with none of them holding a sample, too few shards is not the problem.
        if self.num_samples // (self.batch_size * self.world_size) == 0:
            raise ShardError(_no_full_batch(self.num_samples, self.batch_size, self.world_size))
        readers = self.world_size * self.workers
        if not self.resampled:
            for src in self.sources:
                fit = len(src.urls) // self.world_size
                if len(src.urls) < readers:
                    raise ShardError(
                        f"{src.name!r} has {len(src.urls)} shard(s) but {self.world_size} rank(s) x "
                        f"{self.workers} worker(s) = {readers} readers need one each. Use num_workers <= "
                        f"{fit}, re-shard into more (smaller) shards, or set resampled=True."
                    )
        if self.val_shards is not None:
            self.val_urls = parse_sources(self.val_shards)[0].urls
            check_readable(self.val_urls, "validation shard")
            if len(self.val_urls) < self.world_size:
                raise ShardError(
                    f"{len(self.val_urls)} validation shard(s) for {self.world_size} ranks: every rank needs "
                    "at least one; split the validation set into more shards."
                )
        if self.tokenizer is None:
            self.tokenizer = _default_tokenizer(self.context_length)
        self.train_transform = RandomResizedCrop(self.image_size, scale=self.crop_scale)
        self.eval_transform = ResizeCenterCrop(self.image_size)
        self._ready = True

    def _resolve_rank(self) -> tuple[int, int]:
        if self._rank_arg is not None or self._world_size_arg is not None:
            rank, world = (self._rank_arg or 0), (self._world_size_arg or 1)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        return rank, world

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch: num_samples // (batch_size * world_size)."""
        self.setup()
        return self.num_samples // (self.batch_size * self.world_size)

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> _EpochLoader:
        self.setup()
        return _EpochLoader(self)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_shards is None:
            return []
        urls = self.val_urls[self.rank :: self.world_size]
        workers = min(self.num_workers, len(urls))
        stream = _EvalStream(
            urls, batch_size=self.batch_size, transform=self.eval_transform, tokenizer=self.tokenizer
        )
        return self._loader(stream, workers)

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            multiprocessing_context=_worker_context(self.worker_start_method) if workers > 0 else None,
        )

    def _new_epoch_loader(self) -> DataLoader:
        """A DataLoader over the rest of the current epoch (or the next one if it is complete)."""
        self.setup()
        self._apply_pending_state()
        if self._consumed >= self.batches_per_epoch:
            self._corrupt_before += sum(self._corrupt)
            self._reset_position(self._epoch + 1)
        exact = self._samples_read is not None
        stream = _TrainStream(
            self.sources,
            batch_size=self.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            epoch=self._epoch,
            seed=self.seed,
            resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer,
            transform=self.train_transform,
            tokenizer=self.tokenizer,
            start_index=self._consumed,
            start_samples_read=list(self._samples_read) if exact else None,
            start_corrupt=list(self._corrupt) if exact else None,
        )
        return self._loader(stream, self.num_workers)

    # ---------------------------------------------------------------- data position
    def _reset_position(self, epoch: int) -> None:
        self._epoch = epoch
        self._consumed = 0
        self._samples_read: list[int] | None = [0] * self.workers
        self._corrupt = [0] * self.workers

    def _advance(self, info: dict) -> None:
        """Record that the batch carrying `info` has been consumed."""
        if info["epoch"] != self._epoch:
            self._corrupt_before += sum(self._corrupt)
            self._reset_position(info["epoch"])
        self._consumed = info["index"] + 1
        if self._samples_read is not None:
            self._samples_read[info["worker"]] = info["samples_read"]
        self._corrupt[info["worker"]] = info["corrupt"]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called by Lightning just before a batch is used: the exact point at which it counts as consumed.
        if self.trainer is not None and self.trainer.training and isinstance(batch, tuple | list):
            info = batch[2] if len(batch) > 2 else None
            if isinstance(info, dict) and "samples_read" in info:
                self._advance(info)
        return batch

    @property
    def corrupt_samples(self) -> int:
        """Samples skipped on this rank so far (all epochs), as of the last consumed batch: undecodable
        ones, and those promised by a damaged shard's manifest or stats count but cut off."""
        return self._corrupt_before + sum(self._corrupt)

    def state_dict(self) -> dict[str, Any]:
        self._apply_pending_state()
        return {
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self.seed,
            "world_size": self.world_size if self._ready else self._world_size_arg,
            "num_workers": self.num_workers,
            "samples_read": None if self._samples_read is None else list(self._samples_read),
            "corrupt": list(self._corrupt),
            "corrupt_before": self._corrupt_before,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied lazily: Lightning may restore before setup() has resolved the world size.
        self._pending_state = dict(state_dict)

    def _apply_pending_state(self) -> None:
        if self._pending_state is None or not self._ready:
            return
        state, self._pending_state = self._pending_state, None
        if state["seed"] != self.seed:
            warnings.warn(
                f"data position was saved with seed {state['seed']}, config says {self.seed}; resuming with "
                f"seed {state['seed']} so that the epoch continues as it started",
                stacklevel=2,
            )
            self.seed = state["seed"]
        self._reset_position(int(state["epoch"]))
        self._consumed = int(state["batches_consumed"])
        self._corrupt_before = int(state.get("corrupt_before", 0))
        saved_layout = (state.get("world_size"), state.get("num_workers"))
        same_layout = saved_layout == (self.world_size, self.num_workers)
        if same_layout and state.get("samples_read") is not None:
            self._samples_read = list(state["samples_read"])
            self._corrupt = list(state["corrupt"])
        else:
            if self._consumed < self.batches_per_epoch:
                warnings.warn(
                    f"data position was saved with world_size={state.get('world_size')}, num_workers="
                    f"{state.get('num_workers')}; now {self.world_size}, {self.num_workers}. The epoch "
                    f"resumes after {self._consumed} batches per rank; which samples those were is "
                    "approximated",
                    stacklevel=2,
                )
            self._corrupt_before += sum(state.get("corrupt", []))
            self._samples_read = None
