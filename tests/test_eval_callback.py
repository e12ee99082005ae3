"""The evaluation callback: the rank split and gathering (explicit ranks, then two real gloo processes),
a real Lightning fit that logs the metrics, and the Hydra config entry."""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_support import (
    shared_tokenizer,
    tiny_model,
    write_captioned_folder,
    write_colour_folder,
)
from gloo_support import free_port, init_gloo
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from clip_train.checkpoints import clip_config_to_dict, load_model
from clip_train.evaluation import (
    DatasetError,
    captioned_folder,
    evaluate_retrieval,
    evaluate_zero_shot,
    image_folder,
)
from clip_train.evaluation.callback import EvaluationCallback
from clip_train.evaluation.distributed import gather_rows, rank_range, torch_all_gather
from clip_train.losses import ContrastiveLoss
from clip_train.train import CONFIG_DIR
from clip_train.training.lightning_module import CLIPTrainingModule

CAPTIONS = [["a red square", "red"], ["two green dots"], ["a blue line", "blue", "a line"], ["grey"], ["x"]]


# --------------------------------------------------------------------------------- rank split, gathering
def test_rank_ranges_cover_every_item_once_and_are_balanced():
    for world in range(1, 6):
        for n in range(0, 23):
            ranges = [rank_range(n, r, world) for r in range(world)]
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="rank must lie in"):
        rank_range(5, 2, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 7, 12])
def test_gather_rows_with_explicit_ranks(n, world):
    full = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    longest = len(rank_range(n, 0, world))

    def padded(r: int) -> torch.Tensor:  # what rank r sends: its slice, padded with a marker
        out = torch.full((longest, 3), -1.0)
        part = full[rank_range(n, r, world).start : rank_range(n, r, world).stop]
        out[: len(part)] = part
        return out

    for rank in range(world):

        def all_gather(tensor: torch.Tensor, rank: int = rank) -> torch.Tensor:
            assert tensor.shape == (longest, 3)
            assert torch.equal(
                tensor[: len(rank_range(n, rank, world))], padded(rank)[: len(rank_range(n, rank, world))]
            )
            return torch.stack([padded(r) for r in range(world)])

        mine = rank_range(n, rank, world)
        assert torch.equal(gather_rows(full[mine.start : mine.stop], n, rank, world, all_gather), full)


def test_gather_rows_checks_its_slice():
    with pytest.raises(ValueError, match="holds 2 rows, expected 3"):
        gather_rows(torch.zeros(2, 1), 5, 0, 2, None)


# ------------------------------------------------------------------------------- two real gloo processes


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    init_gloo(rank, world, port)
    try:
        model = load_model(Path(root) / "model.pt")
        zs = evaluate_zero_shot(
            model,
            image_folder(Path(root) / "colours"),
            ["a photo of a {}.", "{}"],
            rank=rank,
            world=world,
            all_gather=torch_all_gather,
        )
        rt = evaluate_retrieval(
            model,
            captioned_folder(Path(root) / "captioned"),
            rank=rank,
            world=world,
            all_gather=torch_all_gather,
        )
        torch.save({"zero_shot": zs.probabilities, "retrieval": rt.to_dict()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    from clip_train.checkpoints import save_model

    save_model(tiny_model(seed=7), tmp_path / "model.pt")
    write_colour_folder(tmp_path / "colours", per_class=3)  # 9 images: 5 + 4 over two ranks
    write_captioned_folder(tmp_path / "captioned", CAPTIONS)  # 5 images, 9 captions
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)

    model = load_model(tmp_path / "model.pt")
    single_zs = evaluate_zero_shot(model, image_folder(tmp_path / "colours"), ["a photo of a {}.", "{}"])
    single_rt = evaluate_retrieval(model, captioned_folder(tmp_path / "captioned"))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["zero_shot"], single_zs.probabilities)
        assert got["retrieval"] == pytest.approx(single_rt.to_dict())


# ----------------------------------------------------------------------------------- a real Lightning fit
class _Batches(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        tokenizer = shared_tokenizer()
        for _ in range(3):
            yield torch.randn(4, 3, 32, 32, generator=g), tokenizer(["a red one", "green", "a blue", "grey"])


class _RecordConfig(pl.Callback):
    """What the training module will do on save: record the model's config in the checkpoint."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["clip_config"] = clip_config_to_dict(pl_module.model.config)


def test_fit_logs_evaluations_every_k_steps_and_at_the_end(tmp_path):
    write_colour_folder(tmp_path / "colours", per_class=2)
    write_captioned_folder(tmp_path / "captioned", CAPTIONS)
    callback = EvaluationCallback(
        every_n_steps=2,
        zero_shot=[{"name": "colours", "imagefolder": str(tmp_path / "colours"), "templates": "imagenet80"}],
        retrieval=[{"name": "caps", "folder": str(tmp_path / "captioned")}],
        batch_size=4,
    )
    torch.manual_seed(0)
    module = CLIPTrainingModule(
        tiny_model(seed=0).train(), ContrastiveLoss(check_finite=False), partial(torch.optim.AdamW, lr=1e-3)
    )
    logger = pl.loggers.CSVLogger(tmp_path, name="logs", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, _RecordConfig()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(), batch_size=None))

    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = {int(r["step"]): r for r in rows if r.get("eval/colours/zero_shot_top1")}
    assert sorted(evaluated) == [2, 3]  # every 2 steps, and at the end (step 3)
    for row in evaluated.values():
        assert 0.0 <= float(row["eval/colours/zero_shot_top1"]) <= 1.0
        assert 0.0 <= float(row["eval/caps/image_to_text_R@1"]) <= float(row["eval/caps/image_to_text_R@5"])
    assert module.model.training  # put back into training mode
    assert "eval/caps/text_to_image_R@10" in trainer.callback_metrics

    # The metrics are those of the trained model evaluated on its own.
    final = evaluate_zero_shot(
        module.model.eval(), image_folder(tmp_path / "colours"), callback.zero_shot_sets[0].templates
    )
    assert float(evaluated[3]["eval/colours/zero_shot_top1"]) == pytest.approx(final.metrics.top1)

    # A real Lightning checkpoint, loaded back by load_model (weights_only) into the same model.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), module.model.encode_image(images))


def _ddp_fit_rank(rank: int, world: int, port: int, root: str) -> None:
    """One rank of a 2-process CPU DDP fit, started like a launcher would (LOCAL_RANK set), so that
    Lightning joins the gloo group instead of spawning processes itself."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "NODE_RANK": "0",
        "LOCAL_RANK": str(rank),
        "RANK": str(rank),
    }
    torch.set_num_threads(1)  # two ranks on a 2-core machine: more threads only oversubscribe it
    callback = EvaluationCallback(
        every_n_steps=1,
        zero_shot=[{"name": "colours", "imagefolder": str(Path(root) / "colours"), "templates": "single"}],
        retrieval=[{"name": "caps", "folder": str(Path(root) / "captioned")}],
        batch_size=2,  # several batches per rank
    )
    module = CLIPTrainingModule(
        tiny_model(seed=9).train(), ContrastiveLoss(check_finite=False), partial(torch.optim.AdamW, lr=1e-5)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_steps=2,
        logger=pl.loggers.CSVLogger(root, name="logs", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(), batch_size=None))
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"metrics": metrics, "state": state}, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_fit_logs_what_one_process_computes_for_the_same_weights(tmp_path):
    write_colour_folder(tmp_path / "colours", per_class=3)  # 9 images: 5 + 4 over two ranks
    write_captioned_folder(tmp_path / "captioned", CAPTIONS)  # 5 images, 9 captions
    mp.spawn(_ddp_fit_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, tensor in ranks[0]["state"].items():  # DDP kept the replicas identical
        torch.testing.assert_close(ranks[1]["state"][name], tensor, rtol=0, atol=0)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank computed the same metrics

    with open(tmp_path / "logs" / "metrics.csv") as f:
        logged = {int(r["step"]): r for r in csv.DictReader(f) if r.get("eval/colours/zero_shot_top1")}
    assert sorted(logged) == [1, 2]  # every step; the end of training (step 2) is not repeated

    # One process, the final weights, the same sets: the metrics logged at the last step.
    model = tiny_model(seed=9)
    model.load_state_dict(ranks[0]["state"])
    assert not torch.equal(model.logit_scale, tiny_model(seed=9).logit_scale)  # two steps did train it
    single = evaluate_zero_shot(model.eval(), image_folder(tmp_path / "colours"), ["a photo of a {}."])
    retrieval = evaluate_retrieval(model, captioned_folder(tmp_path / "captioned"))
    expected = {
        "eval/colours/zero_shot_top1": single.metrics.top1,
        "eval/colours/zero_shot_top5": single.metrics.top5,
        "eval/colours/zero_shot_mean_per_class_recall": single.metrics.mean_per_class_recall,
        **{f"eval/caps/image_to_text_R@{k}": v for k, v in retrieval.image_to_text.items()},
        **{f"eval/caps/text_to_image_R@{k}": v for k, v in retrieval.text_to_image.items()},
    }
    # Seed 9's predictions depend on the colour, so rank 1's images lost or misplaced in the gathering
    # would change top-1; a model predicting one class for every image would not show it.
    assert 0 < single.metrics.top1 < 1 and len(set(single.predictions.tolist())) > 1
    for key, value in expected.items():
        assert float(logged[2][key]) == pytest.approx(value, abs=1e-6), key
        assert ranks[0]["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_bad_evaluation_sets_fail_at_setup(tmp_path):
    callback = EvaluationCallback(zero_shot=[{"name": "x", "imagefolder": str(tmp_path / "absent")}])
    with pytest.raises(FileNotFoundError, match="absent"):
        callback.load_sets()
    callback = EvaluationCallback(zero_shot=[{"name": "x", "shards": str(tmp_path / "a.tar")}])
    with pytest.raises(DatasetError, match="labelled shards need 'classnames'"):
        callback.load_sets()
    with pytest.raises(ValueError, match="at least one zero_shot or retrieval set"):
        EvaluationCallback()


def test_hydra_config_entry_builds_the_callback(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=1)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "callbacks=zero_shot_eval",
                "callbacks.zero_shot_eval.every_n_steps=7",
                f"callbacks.zero_shot_eval.zero_shot=[{{name:colours,imagefolder:'{folder}',templates:imagenet80}}]",
            ],
        )
    assert set(cfg.callbacks) >= {"checkpoint", "zero_shot_eval"}  # the defaults are kept
    callback = instantiate(cfg.callbacks.zero_shot_eval)
    assert isinstance(callback, EvaluationCallback) and callback.every_n_steps == 7
    callback.load_sets()
    assert len(callback.zero_shot_sets[0].templates) == 80 and len(callback.zero_shot_sets[0].dataset) == 3
