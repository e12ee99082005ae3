"""`python -m clip_train` under Lightning's FSDP and DeepSpeed ZeRO 2 and 3 strategies, whole, on two CPU
processes.

The strategy of trainer=fsdp / trainer=deepspeed_zero{1,2,3} is swapped for its subclass in sharded_on_cpu.py,
which lifts Lightning's CPU refusals and nothing else: wrapping, the training step, checkpoints, resume and
the evaluation callback run Lightning's, torch's and DeepSpeed's own code. In fp32 every strategy must follow
the loss and temperature trajectory of DDP on the same shards to float rounding, also across a restart
from its own checkpoint half-way. Run this way, three faults showed that would have stopped or silently
spoiled a GPU run just the same:
- FSDP: Lightning wrapped the whole LightningModule and ran the training step inside FSDP's forward, where
  our manual backward is refused ("Expects BACKWARD_PRE or BACKWARD_POST state"); the module now wraps the
  model itself, one FSDP unit per residual block (training/sharding.py, wrap_for_fsdp);
- ZeRO-3: the loss module's hooks asserted in the backward pass ("active_backward_submodules is empty"): its
  output was a dataclass, like CLIPOutput below; both are named tuples now;
- ZeRO-3: the temperature's gradient was dropped at every step (CLIPOutput was a dataclass, which ZeRO-3's
  output hooks do not look into): the loss followed DDP's, the temperature stayed where it started;
- FSDP and ZeRO-3: validation hung when ranks ran different numbers of batches (each sharded forward pass
  gathers parameters from all ranks, even inside full_parameters); it and the evaluation callback, which
  gathered parameters the same way, now run a plain copy of the model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_support import write_crawler_shards
from eval_support import write_colour_folder

from clip_train.checkpoints import CheckpointError, load_model
from clip_train.train import CONFIG_DIR
from clip_train.training.loggers import read_metrics
from clip_train.training.preflight import ConfigError, check_hardware

TESTS = Path(__file__).resolve().parent
# ZeRO-1 is left to scripts/tools/gpu_checks.sh: it is ZeRO-2 without gradient partitioning, through the
# same Lightning strategy and checkpoint layout, and each run here costs the suite about a minute.
STRATEGIES = {
    "fsdp": "sharded_on_cpu.FSDPOnCPU",
    "deepspeed_zero2": "sharded_on_cpu.DeepSpeedOnCPU",
    "deepspeed_zero3": "sharded_on_cpu.DeepSpeedOnCPU",
}
STEPS = 4


def _train(root: Path, shards: str, colours: Path, run_name: str, steps: int, *trainer: str) -> str:
    val = shards.replace("{000000..000003}", "{000000..000002}")  # three of the training shards
    args = [
        # No loader worker processes: with DeepSpeed's CPU accelerator loaded, a worker forked from a rank
        # once hung for good right after the fork (under load from another test run; fork after threads).
        # The batches are the same either way (one logical reader per rank).
        f"data.train_shards='{shards}'", "data.num_workers=0", f"paths.root_dir={root}",
        f"run_name={run_name}", "model=vit_tiny", "global_batch_size=16", "scheduler.warmup_steps=3",
        "module.gradient_clip_norm=null",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "logger.0.flush_logs_every_n_steps=1",
        "callbacks=zero_shot_eval", "callbacks.zero_shot_eval.every_n_steps=2", "~callbacks.progress",
        # 9 images in batches of 2: rank 0 runs 3 batches, rank 1 2 (an uneven split must not hang).
        "callbacks.zero_shot_eval.batch_size=2",
        f"callbacks.zero_shot_eval.zero_shot=[{{name:colours,imagefolder:'{colours}',templates:single}}]",
        "callbacks.checkpoint.every_n_train_steps=2", f"data.val_shards='{val}'",
        "trainer.val_check_interval=2", *trainer,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "clip_train", *args], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too, which Lightning started and would outlive us
        out, _ = proc.communicate()
        pytest.fail(f"{run_name} ({' '.join(trainer)}) still running after 300 s:\n{out[-6000:]}")
    assert proc.returncode == 0, f"{run_name} ({' '.join(trainer)}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """DDP for STEPS steps; every sharded strategy for half of them, then again from its checkpoint."""
    root = tmp_path_factory.mktemp("sharded_lightning")
    shards = write_crawler_shards(root / "shards", [24, 24, 24, 24], image_size=40)
    colours = write_colour_folder(root / "colours", per_class=3)
    logs = {"ddp": _train(root, shards, colours, "ddp", STEPS, "trainer=ddp_cpu")}
    for trainer, target in STRATEGIES.items():
        # With gradient checkpointing, which is exact: the trajectory must still be DDP's.
        options = (
            f"trainer={trainer}",
            f"trainer.strategy._target_={target}",
            "module.grad_checkpointing=true",
        )
        first = _train(root, shards, colours, trainer, STEPS // 2, *options)
        logs[trainer] = first + _train(root, shards, colours, trainer, STEPS, *options)
    return root, logs


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("trainer", list(STRATEGIES))
def test_a_sharded_strategy_trains_like_ddp_across_a_restart(runs, trainer):
    root, logs = runs
    assert "resuming from" in logs[trainer]
    expected = read_metrics(root / "runs/ddp/logs/metrics.csv")
    actual = read_metrics(root / f"runs/{trainer}/logs/metrics.csv")
    steps = sorted(s for s, m in actual.items() if "train/loss" in m)
    assert steps == list(range(STEPS)), f"steps logged across the two attempts: {steps}"
    for step in steps:
        for key in ("train/loss", "train/logit_scale"):
            assert actual[step][key] == pytest.approx(expected[step][key], abs=1e-5), (step, key)
    # The temperature moved (ZeRO-3 once dropped its gradient and it stayed at its initial value).
    assert actual[STEPS - 1]["train/logit_scale"] < actual[0]["train/logit_scale"] - 1e-3
    # The evaluation callback ran on the sharded model, at the same steps and with DDP's results.
    evaluated = {s: m for s, m in actual.items() if "eval/colours/zero_shot_top1" in m}
    assert sorted(evaluated) == sorted(s for s, m in expected.items() if "eval/colours/zero_shot_top1" in m)
    for step, metrics in evaluated.items():
        assert metrics["eval/colours/zero_shot_top1"] == expected[step]["eval/colours/zero_shot_top1"]
    # Validation (every 2 steps) on the sharded model: DDP's losses on the same held-out samples.
    validated = sorted(s for s, m in actual.items() if "val/loss" in m)
    assert validated == [2, 4] == sorted(s for s, m in expected.items() if "val/loss" in m)
    for step in validated:
        assert actual[step]["val/samples"] == expected[step]["val/samples"] == 72
        assert actual[step]["val/loss"] == pytest.approx(expected[step]["val/loss"], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_clips_gradients_as_ddp_does(tmp_path):
    """The module's clip norm goes into DeepSpeed's config (train.build_strategy), where the engine clips;
    a norm this small clips every step, so a clip that did not happen would show in the losses."""
    shards = write_crawler_shards(tmp_path / "shards", [24, 24, 24, 24], image_size=40)
    colours = write_colour_folder(tmp_path / "colours", per_class=2)
    clip = ("module.gradient_clip_norm=0.05", "~callbacks.zero_shot_eval")
    target = f"trainer.strategy._target_={STRATEGIES['deepspeed_zero3']}"
    _train(tmp_path, shards, colours, "ddp", 3, "trainer=ddp_cpu", *clip)
    _train(tmp_path, shards, colours, "zero3", 3, "trainer=deepspeed_zero3", target, *clip)
    expected = read_metrics(tmp_path / "runs/ddp/logs/metrics.csv")
    actual = read_metrics(tmp_path / "runs/zero3/logs/metrics.csv")
    for step in range(3):
        assert actual[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], abs=1e-5), step
    unclipped_step_1 = 4.167  # the same run without clipping (test above), to 3 decimals
    assert abs(actual[1]["train/loss"] - unclipped_step_1) > 0.02


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sharded_checkpoints_hold_ddps_weights(runs, tmp_path):
    """FSDP writes one full checkpoint that evaluation loads as is; DeepSpeed writes a directory of shards,
    which load_model refuses with the conversion command, and which after it holds DDP's weights."""
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    root, _ = runs
    reference = load_model(root / "runs/ddp/checkpoints/last.ckpt").state_dict()

    def assert_same_weights(model: torch.nn.Module) -> None:
        state = model.state_dict()
        assert state.keys() == reference.keys()
        for name, value in state.items():
            # atol: the attention's key bias has a true gradient of zero (softmax ignores a shift shared by
            # every key), so Adam scales rounding noise of order 1e-10 into updates: under ZeRO-3 up to
            # 1.5e-5 apart from DDP after 4 steps. Every other weight agrees to rounding.
            torch.testing.assert_close(value, reference[name], atol=1e-4, rtol=1e-4, msg=name)

    assert_same_weights(load_model(root / "runs/fsdp/checkpoints/last.ckpt"))
    for stage in (2, 3):
        directory = root / f"runs/deepspeed_zero{stage}/checkpoints/last.ckpt"
        assert directory.is_dir()
        with pytest.raises(CheckpointError, match="convert_zero_checkpoint_to_fp32_state_dict"):
            load_model(directory)
        converted = tmp_path / f"zero{stage}.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(converted))
        assert_same_weights(load_model(converted))


def test_only_a_strategy_that_says_it_runs_on_cpu_escapes_the_cuda_check():
    from hydra import compose, initialize_config_dir

    def cfg(*overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=["data.train_shards=x", *overrides])

    if not torch.cuda.is_available():
        # A subclass of a sharded strategy is still refused unless it declares runs_on_cpu.
        plain = "pytorch_lightning.strategies.DeepSpeedStrategy"
        with pytest.raises(ConfigError, match="needs CUDA"):
            check_hardware(cfg("trainer=deepspeed_zero2", f"trainer.strategy._target_={plain}"))
    # sharded_on_cpu is importable here as it is in the runs (pytest puts tests/ on the path).
    fsdp_on_cpu = f"trainer.strategy._target_={STRATEGIES['fsdp']}"
    check_hardware(cfg("trainer=fsdp", "trainer.accelerator=cpu", fsdp_on_cpu))
    with pytest.raises(ConfigError, match="names no class"):
        check_hardware(
            cfg("trainer=fsdp", "trainer.strategy._target_=pytorch_lightning.strategies.NoSuchStrategy")
        )


def test_validation_under_lightnings_own_zero3_strategy_is_refused_before_training():
    from hydra import compose, initialize_config_dir

    from clip_train.train import train

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data.train_shards=x", "data.val_shards=y", "trainer=deepspeed_zero3", "trainer.accelerator=cpu",
            # Lightning's class, with the CPU refusal lifted as in sharded_on_cpu (not our validating one).
            "trainer.strategy._target_=sharded_on_cpu.LightningDeepSpeedOnCPU",
        ])  # fmt: skip
    with pytest.raises(ConfigError, match="needs the trainer=deepspeed_zero3 strategy class"):
        train(cfg)
