"""Lightning's FSDP strategy on CPU processes, for tests: the real strategy with the two CPU refusals lifted.

Lightning refuses FSDP without a GPU (in the accelerator connector, only for the FSDPStrategy class itself,
so a subclass passes), and it wraps with `device_id=None` on a CPU, which torch's FSDP refuses; torch's
FSDP itself trains on CPU processes over gloo. One more difference from a GPU run: full state dicts are
gathered without `offload_to_cpu`, which on a CPU-only process makes torch 2.13 read freed memory
(SIGSEGV in FSDP's state-dict clone; offloading from a GPU copies first). Everything else, wrapping,
training, checkpoints, resume, is Lightning's and torch's own code. Used through Hydra:
`trainer=fsdp trainer.accelerator=cpu trainer.strategy._target_=sharded_on_cpu.FSDPOnCPU`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytorch_lightning.strategies.fsdp as lightning_fsdp
import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from clip_train.training.sharding import ValidatingDeepSpeedStrategy


@contextlib.contextmanager
def _full_state_dict_without_offload(module: nn.Module, world_size: int, rank0_only: bool = True) -> Iterator:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    with FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    ):
        yield


class FSDPOnCPU(FSDPStrategy):
    runs_on_cpu = True  # read by clip_train.training.preflight.check_hardware

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Read by Lightning's save and load paths at call time.
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_without_offload

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        ):
            yield


class DeepSpeedOnCPU(ValidatingDeepSpeedStrategy):
    runs_on_cpu = True  # read by clip_train.training.preflight.check_hardware

    def setup_environment(self) -> None:
        # DeepSpeedStrategy's own check refuses anything but a CUDA accelerator; the rest is DDP's.
        super(DeepSpeedStrategy, self).setup_environment()

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed's engine takes its device from this index; a plain CPU device has none.
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        # Lightning checks that each process's GPU index equals its local rank; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class LightningDeepSpeedOnCPU(DeepSpeedStrategy):
    """Lightning's own DeepSpeedStrategy, marked as running on CPU: for the check that refuses it."""

    runs_on_cpu = True
