"""Every recipe composes to the values it means: the demo's (no experiment) and each configs/experiment/ file.

The table below is the intended recipe of each, written out by hand: a change to a group default, to the
demo's recipe or to one experiment that moves another recipe shows up here as a failure.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from clip_train.train import CONFIG_DIR


class Recipe(NamedTuple):
    model: str  # the model's name_or_config, or the model config chosen where it has none (the student)
    data: str  # the data config chosen
    precision: str
    global_batch_size: int
    warmup_steps: int
    max_epochs: int
    max_steps: int  # -1: max_epochs decides
    lr: float
    weight_decay: float
    checkpoint_every_n_steps: int


# "demo" is `python -m clip_train` with no experiment (make demo); every other row is +experiment=<row>.
# The paper recipes' learning rates are those of the CLIP paper's appendix F (Tables 21-22). distill_demo
# trains in bf16 autocast, as the demo it distils does (`precision: bf16-mixed` under its `trainer:`).
BF16, FP32, WDS = "bf16-mixed", "32-true", "webdataset"
RECIPES: dict[str, Recipe] = {
    "demo":            Recipe("rn-tiny", "demo", BF16, 128, 50, 26, -1, 2.0e-3, 0.1, 100),
    "cpu_tiny":        Recipe("vit-tiny", "demo", FP32, 64, 20, 5, -1, 1.0e-3, 0.1, 50),
    "distill_demo":    Recipe("distill_student", "demo", BF16, 64, 20, 24, -1, 1.0e-3, 0.05, 100),
    "distill_vit_b32": Recipe("distill_student", WDS, BF16, 1024, 1000, 10, -1, 5.0e-4, 0.1, 500),
    "vit_b32":         Recipe("ViT-B/32", WDS, BF16, 32768, 2000, 32, -1, 5.0e-4, 0.2, 1000),
    "vit_b16":         Recipe("ViT-B/16", WDS, BF16, 32768, 2000, 32, -1, 5.0e-4, 0.2, 1000),
    "vit_l14":         Recipe("ViT-L/14", WDS, BF16, 32768, 2000, 32, -1, 4.0e-4, 0.2, 1000),
    "vit_l14_336":     Recipe("ViT-L/14@336px", WDS, BF16, 32768, 2000, 1, -1, 2.0e-5, 0.2, 1000),
    "rn50":            Recipe("RN50", WDS, BF16, 32768, 2000, 32, -1, 5.0e-4, 0.2, 1000),
    "rn101":           Recipe("RN101", WDS, BF16, 32768, 2000, 32, -1, 5.0e-4, 0.2, 1000),
    "rn50x4":          Recipe("RN50x4", WDS, BF16, 32768, 2000, 32, -1, 5.0e-4, 0.2, 1000),
    "rn50x16":         Recipe("RN50x16", WDS, BF16, 32768, 2000, 32, -1, 4.0e-4, 0.2, 1000),
    "rn50x64":         Recipe("RN50x64", WDS, BF16, 32768, 2000, 32, -1, 3.6e-4, 0.2, 1000),
}  # fmt: skip

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _overrides(recipe: str) -> list[str]:
    if recipe == "demo":
        return []
    # The distillation recipes name their teacher; composing needs one, not the file.
    teacher = ["teacher=teacher.pt"] if recipe.startswith("distill") else []
    return [f"+experiment={recipe}", *teacher]


def _compose(config_dir: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _recipe_of(cfg: DictConfig) -> Recipe:
    choices = cfg.hydra.runtime.choices
    return Recipe(
        model=cfg.model.get("name_or_config") or choices.model,
        data=choices.data,
        precision=cfg.trainer.precision,
        global_batch_size=cfg.global_batch_size,
        warmup_steps=cfg.scheduler.warmup_steps,
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        checkpoint_every_n_steps=cfg.callbacks.checkpoint.every_n_train_steps,
    )


@pytest.mark.parametrize("recipe", ["demo", *EXPERIMENTS])
def test_every_recipe_composes_to_the_values_in_the_table(recipe):
    assert recipe in RECIPES, f"experiment/{recipe}.yaml has no row in RECIPES: add its intended values"
    assert _recipe_of(_compose(CONFIG_DIR, _overrides(recipe))) == RECIPES[recipe]


def test_no_part_of_the_demo_recipe_reaches_an_experiment(tmp_path):
    """The demo's own values are composed without an experiment only, whatever keys they come to hold."""
    configs = shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    demo_recipe = configs / "recipe" / "demo.yaml"
    demo_recipe.write_text(demo_recipe.read_text() + "from_the_demo_recipe: true\n")
    assert _compose(configs, []).from_the_demo_recipe
    for experiment in EXPERIMENTS:
        assert "from_the_demo_recipe" not in _compose(configs, _overrides(experiment)), experiment
    assert set(RECIPES) == {"demo", *EXPERIMENTS}, "RECIPES has a row for a recipe that no longer exists"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_data_workers_default_to_no_more_than_the_cpus_this_process_may_use():
    data = _compose(CONFIG_DIR, ["+experiment=vit_b32", "data.train_shards=x"]).data
    assert data.num_workers is None
    every_cpu = os.sched_getaffinity(0)
    assert instantiate(data).num_workers == min(4, len(every_cpu))
    os.sched_setaffinity(0, {min(every_cpu)})
    try:
        workers = instantiate(data).num_workers
        assert workers == 1
        # PyTorch's own check: no warning that the loader has more workers than this process has CPUs.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            next(iter(DataLoader(range(2), num_workers=workers)))
    finally:
        os.sched_setaffinity(0, every_cpu)
