"""Training under the sharded strategies (DeepSpeed, FSDP): what can be checked without CUDA.

On an H200 (torch 2.11, DeepSpeed 0.19.8) every DeepSpeed stage failed in its first broadcast of the model
("self.dim() cannot be 0 to view BFloat16 as Byte": the 0-dim temperature) and FSDP refused the model ("FSDP
doesn't support scalar parameters"). The training module now gives 0-dim parameters the shape (1,) under
those strategies. torch's FSDP and DeepSpeed's engine run on a CPU (gloo, DeepSpeed's CPU accelerator),
and both failures reproduce there: these tests wrap the model in real
FSDP and in DeepSpeed ZeRO 1-3 on two CPU processes and train a step; for FSDP they also save the full state
dict as a Lightning checkpoint and load it back with clip_train.checkpoints; for both they run the towers
outside the wrapped forward inside `full_parameters`, as the evaluation callback does. The whole program
under Lightning's strategies: tests/test_sharded_lightning.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_support import free_port, init_gloo
from omegaconf import OmegaConf
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from sharded_on_cpu import FSDPOnCPU
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from clip_train.checkpoints import CheckpointError, clip_config_to_dict, load_model
from clip_train.losses import ContrastiveLoss
from clip_train.models import build_model
from clip_train.train import resume_checkpoint
from clip_train.training.lightning_module import CLIPTrainingModule
from clip_train.training.optim import decayed_parameter_names, parameter_groups
from clip_train.training.sharding import (
    clamp_master_copy_,
    full_parameters,
    is_sharded,
    promote_scalar_parameters,
)

WORLD = 2
EOT = 49407


def _batch(model, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.zeros(n, model.context_length, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:6] = torch.randint(1, 1000, (n, 5), generator=g)
    tokens[:, 6] = EOT
    return images, tokens


def test_promote_scalar_parameters_keeps_the_loss_and_its_gradients():
    torch.manual_seed(0)
    plain = build_model("vit-tiny")
    promoted = build_model("vit-tiny")
    promoted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.logit_scale.fill_(3.0)
        promoted.logit_scale.fill_(3.0)
    assert promote_scalar_parameters(promoted) == ["logit_scale"]
    assert promoted.logit_scale.shape == (1,)
    assert plain.logit_scale.shape == ()

    images, tokens = _batch(plain)
    losses, grads = [], []
    for model in (plain, promoted):
        out = model(images, tokens)
        assert out.logit_scale.shape == ()  # the loss sees a 0-dim scale either way
        loss = ContrastiveLoss()(out.image_embeds, out.text_embeds, out.logit_scale).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.logit_scale.grad.reshape(()).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0] == pytest.approx(grads[1], rel=1e-5)
    assert grads[0] != 0.0

    # clamping after a step works on the promoted shape too
    with torch.no_grad():
        promoted.logit_scale.fill_(9.0)
    promoted.clamp_logit_scale_()
    assert promoted.logit_scale.item() == pytest.approx(promoted.config.max_logit_scale)


def test_siglip_bias_is_promoted_too():
    model = build_model("vit-tiny", init_logit_bias=-10.0)
    assert sorted(promote_scalar_parameters(model)) == ["logit_bias", "logit_scale"]
    scale, bias = model.logit_scale_and_bias()
    assert scale.shape == () and bias.shape == () and bias.item() == -10.0


@pytest.mark.parametrize(
    ("make_strategy", "promoted"), [(FSDPOnCPU, True), (DDPStrategy, False), (lambda: "auto", False)]
)
def test_training_module_promotes_only_under_sharded_strategies(make_strategy, promoted):
    model = build_model("vit-tiny")
    module = CLIPTrainingModule(model=model, loss=ContrastiveLoss(), optimizer=torch.optim.AdamW)
    # Lightning builds its own FSDPStrategy only with CUDA; the test subclass lifts that refusal alone.
    module.trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=make_strategy(), logger=False, enable_progress_bar=False
    )
    module.configure_model()
    assert (model.logit_scale.shape == (1,)) is promoted
    assert is_sharded(module.trainer.strategy) is promoted


def test_registered_strategy_names_are_recognised():
    assert is_sharded("deepspeed_stage_3")
    assert is_sharded("fsdp")
    assert not is_sharded("ddp")
    assert not is_sharded("auto")


# ------------------------------------------------------------------------- real FSDP on two CPU processes


def _fsdp_rank(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, port)
    torch.set_num_threads(1)
    result: dict = {}
    try:
        torch.manual_seed(0)
        try:
            FSDP(build_model("vit-tiny"), device_id=torch.device("cpu"))
            result["unpromoted"] = "wrapped"
        except ValueError as e:
            result["unpromoted"] = str(e)

        torch.manual_seed(0)
        model = build_model("vit-tiny")
        decayed = decayed_parameter_names(model, model.no_weight_decay_param_names())
        promote_scalar_parameters(model)
        # As configs/trainer/fsdp.yaml: the original parameters stay visible (as 1-D views of their shards).
        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        groups = parameter_groups(model, 0.1, decayed_names=decayed)
        result["decayed"] = (len(decayed), len(groups[0]["params"]))
        # Deciding by shape after wrapping would decay nothing: every view is 1-D.
        result["decayed_if_decided_after_wrapping"] = len(parameter_groups(model, 0.1)[0]["params"])
        optimizer = torch.optim.AdamW(groups, lr=1e-2)
        images, tokens = _batch(model, seed=rank)
        out = wrapped(images, tokens)
        result["scale_shape"] = tuple(out.logit_scale.shape)
        loss = ContrastiveLoss()(out.image_embeds, out.text_embeds, out.logit_scale).loss
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()  # on the local shard of the flat parameter: must not raise
        # The evaluation callback calls the towers outside the wrapped forward: it gathers them first.
        strategy = FSDPStrategy()
        strategy.model = wrapped
        with torch.no_grad(), full_parameters(strategy, model):
            result["images"] = images
            result["embeds_in_full_parameters"] = model.encode_image(images)
        with FSDP.state_dict_type(
            wrapped,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
        ):
            state = wrapped.state_dict()
        if rank == 0:
            torch.save(
                {
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "clip_config": clip_config_to_dict(model.config),
                },
                Path(out_dir) / "fsdp.ckpt",
            )
            result["saved_scale"] = state["logit_scale"].clone()
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_fsdp_trains_the_promoted_model_and_its_checkpoint_loads(tmp_path):
    mp.spawn(_fsdp_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in results:
        assert "scalar parameters" in r["unpromoted"]  # the failure seen on the H200, reproduced on CPU
        assert r["scale_shape"] == ()
        n_matrices, n_decayed = r["decayed"]
        assert n_decayed == n_matrices > 10
        assert r["decayed_if_decided_after_wrapping"] == 0
    saved = results[0]["saved_scale"]
    assert saved.shape == (1,)
    assert saved.item() != pytest.approx(float(torch.log(torch.tensor(1 / 0.07))), abs=1e-6)  # it trained

    model = load_model(tmp_path / "fsdp.ckpt")
    assert model.logit_scale.shape == ()
    assert model.logit_scale.item() == pytest.approx(saved.item())
    with torch.no_grad():
        for r in results:  # each rank's towers, gathered, are the trained model's
            torch.testing.assert_close(
                r["embeds_in_full_parameters"], model.encode_image(r["images"]), rtol=1e-4, atol=1e-5
            )


# --------------------------------------------------------------------------------- DeepSpeed checkpoints


def test_a_deepspeed_checkpoint_directory_is_resumed(tmp_path):
    run_dir = tmp_path / "runs" / "zero2"
    (run_dir / "checkpoints" / "last.ckpt" / "checkpoint").mkdir(parents=True)
    cfg = OmegaConf.create({"resume": True, "paths": {"run_dir": str(run_dir)}})
    no_tag_file_yet = pytest.warns(UserWarning, match="not a complete checkpoint")
    with no_tag_file_yet, pytest.raises(CheckpointError, match="every checkpoint in"):
        resume_checkpoint(cfg)
    (run_dir / "checkpoints" / "last.ckpt" / "latest").write_text("checkpoint")  # DeepSpeed writes it last
    assert resume_checkpoint(cfg) == str(run_dir / "checkpoints" / "last.ckpt")


def test_loading_a_deepspeed_checkpoint_directory_says_how_to_convert_it(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"DeepSpeed checkpoint.*convert_zero_checkpoint_to_fp32"):
        load_model(ckpt)


# ------------------------------------------------------------- real DeepSpeed ZeRO 1-3 on two CPU processes
# DeepSpeed runs on a CPU through its CPU accelerator and gloo; Lightning's DeepSpeedStrategy does not (it
# requires CUDA), so these drive the DeepSpeed engine directly, with the model, the promotion and the loss
# the training module uses, in bf16 as trainer=deepspeed_zero* runs them.


def _deepspeed_rank(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    import deepspeed
    from pytorch_lightning.strategies import DeepSpeedStrategy

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(1)
    result: dict = {}
    try:
        for stage in (1, 2, 3):
            for promote in (False, True):
                torch.manual_seed(0)
                model = build_model("vit-tiny")
                if promote:
                    promote_scalar_parameters(model)
                config = {
                    "train_micro_batch_size_per_gpu": 4,
                    "zero_optimization": {"stage": stage},
                    "bf16": {"enabled": True},
                }
                try:
                    engine, *_ = deepspeed.initialize(
                        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config
                    )
                except RuntimeError as e:
                    result[(stage, promote)] = f"initialize failed: {e}"
                    continue
                images, tokens = _batch(model, n=4, seed=rank)
                images = images.bfloat16()
                out = engine(images, tokens)
                loss = ContrastiveLoss()(
                    out.image_embeds.float(), out.text_embeds.float(), out.logit_scale.float()
                ).loss
                engine.backward(loss)
                engine.step()
                model.clamp_logit_scale_()  # under ZeRO-3 the parameter is an empty placeholder here
                entry = {"loss": loss.item(), "scale_shape": tuple(out.logit_scale.shape)}
                if stage < 3:  # the optimiser's fp32 master copy is clamped too
                    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

                    safe_set_full_fp32_param(model.logit_scale, torch.full((1,), 9.0))
                    ds = DeepSpeedStrategy(stage=stage)
                    clamp_master_copy_(ds, model.logit_scale, model.config.max_logit_scale)
                    entry["master_after_clamp"] = safe_get_full_fp32_param(model.logit_scale).item()
                # The evaluation callback's path: the towers outside the engine's forward.
                with torch.no_grad(), full_parameters(DeepSpeedStrategy(stage=stage), model):
                    outside = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
                    inside = engine(images, tokens).image_embeds.float()
                entry["outside_vs_inside"] = (outside - inside).abs().max().item()
                result[(stage, promote)] = entry
                if promote and stage > 1:  # a checkpoint as Lightning's DeepSpeedStrategy writes it
                    engine.save_checkpoint(
                        str(Path(out_dir) / f"zero{stage}.ckpt"),
                        tag="checkpoint",
                        client_state={"clip_config": clip_config_to_dict(model.config)},
                    )
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Without it, gloo's threads could still be running at exit: about one run in six aborted
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> tuple[list[dict], Path]:
    out_dir = tmp_path_factory.mktemp("deepspeed")
    mp.spawn(_deepspeed_rank, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)], out_dir


@pytest.mark.timeout(300)
def test_deepspeed_zero_stages_train_the_promoted_model(deepspeed_run):
    results, _ = deepspeed_run
    for r in results:
        for stage in (1, 2, 3):
            # The failure seen on the H200 under every stage, reproduced on CPU.
            assert "cannot be 0 to view BFloat16" in r[(stage, False)], r[(stage, False)]
            entry = r[(stage, True)]
            assert isinstance(entry, dict), entry
            assert entry["scale_shape"] == ()
            assert math.isfinite(entry["loss"])
            assert entry["outside_vs_inside"] < 2e-2  # bf16 towers, same weights
            if stage < 3:
                assert entry["master_after_clamp"] == pytest.approx(math.log(100.0), rel=1e-6)


@pytest.mark.timeout(300)
def test_a_deepspeed_checkpoint_loads_for_evaluation_after_the_conversion_it_names(deepspeed_run, tmp_path):
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    _, out_dir = deepspeed_run

    for stage in (2, 3):
        directory = out_dir / f"zero{stage}.ckpt"
        with pytest.raises(CheckpointError, match="convert_zero_checkpoint_to_fp32_state_dict") as error:
            load_model(directory)
        assert str(directory) in str(error.value)
        gathered = tmp_path / f"zero{stage}-model.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(gathered))  # as the message says
        model = load_model(gathered)
        assert model.logit_scale.shape == ()
        assert 2.0 < model.logit_scale.item() < 5.0
