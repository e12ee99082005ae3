"""Training-step throughput of clip_train against OpenCLIP 3.3.0, side by side, on this CPU.

    .venv/bin/python scripts/bench/bench_vs_openclip.py            # 8 rows x 3 alternating repetitions
    .venv/bin/python scripts/bench/bench_vs_openclip.py --quick    # 1 repetition, few steps: a smoke run

What is measured: samples per second of whole optimiser steps (forward, contrastive loss, backward, AdamW
update, learning-rate schedule, temperature clamp) over the timed steps after a warm-up, and the peak
resident memory of the process that ran them. Each measurement is one fresh worker process per side, run
alternately (ours, OpenCLIP, ours, OpenCLIP, ...) so that both meet the same machine load; the table gives the
median over the repetitions with the min-max range, the ratio of the medians (ours / OpenCLIP) and the peak
RSS (in brackets: its growth over the RSS just before the model was built, i.e. without the imports).

Rows: model x captions x precision.
* models: "demo", the embedded demo's model (configs/model/demo.yaml: a tiny modified ResNet at 64 px, text
  context 24), and "small-vit" (32 px images, 4 px patches, 4 blocks of width 128 with 4 heads; text: 4
  blocks of width 128 with 4 heads, context 32; 128-d joint space). Both sides build the same
  architecture from the same config (exact GELU on both, as our configs say).
* captions: "demo", the demo's own captions (scripts/demo/scenes.py) tokenised with clip_train's tokenizer,
  and "web-like", random token ids whose lengths (start and end-of-text tokens included) follow a
  log-normal with median 12, clipped to [3, context], as web alt texts are mostly short with a long tail.
  The parent tokenises once and hands both workers the same int64 tensor file (and the same seeded random
  images). Every row holds exactly one end-of-text id (49407, the largest id), so OpenCLIP's pooling at the
  argmax of the ids reads the same position as ours (the first end-of-text token); this is checked.
* precision: fp32, and bf16 autocast (OpenCLIP: torch.autocast("cpu", bfloat16) around forward and loss,
  as its training program does with --precision amp_bf16; ours: Lightning's precision="bf16-mixed").

Our side runs the real training step: `CLIPTrainingModule` built as `python -m clip_train` builds it (module,
loss, optimiser and schedule from configs/ through Hydra) and fitted by a Lightning Trainer on an in-memory
loader that yields what our data module yields, (images, tokens, {"text_lengths": ...}), so the module's
own settings (e.g. text length groups) apply. OpenCLIP's side is a plain loop written here the way
open_clip_train's train_one_epoch runs a step: zero_grad, forward and ClipLoss under autocast, backward,
step, clamp of the temperature, with AdamW over its two parameter groups (gains and biases without weight
decay). AdamW: lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on both sides; ours uses the fused
implementation that configs/optimizer/adamw.yaml selects, OpenCLIP torch's default (as its main.py creates
it); --openclip-fused-adamw gives OpenCLIP the fused one too. The time of a side is the wall time from the
start of the first timed step to the end of the last one, so each framework's per-step overhead counts.

OpenCLIP never enters this project's environment: it runs from its own virtual environment
(--openclip-venv, created when missing) holding the same pinned torch (a CPU build from the local wheel
store), numpy and open_clip_torch==3.3.0 installed without its dependencies. torchvision cannot be
installed beside this torch, and of OpenCLIP's dependencies only numpy is needed by the model and loss
modules (ftfy, regex, huggingface_hub, timm, safetensors serve its tokenizer, hub and timm towers); see
`import_openclip_parts` for how the worker loads them without the package's __init__.

torch.compile: --compile adds compiled rows (ours: the module's compile=True; OpenCLIP: torch.compile of
the model, as its --torchcompile). It is off by default: on this 2-core CPU compiling costs far more than
the timed steps, and with length groups ours compiles one graph per text width.

The machine is shared: compare the ratio within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Pinned so that runs on different days compare against the same reference implementation.
OPENCLIP_VERSION = "3.3.0"
SOT_ID, EOT_ID = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>; EOT is the largest id
WEB_MEDIAN_LENGTH, WEB_SIGMA = 12, 0.75  # web-like caption lengths: log-normal, start/end tokens included
DISTINCT_BATCHES = 4  # the steps cycle over this many different batches
SMALL_VIT: dict[str, Any] = {
    "embed_dim": 128,
    "vision": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32},
    "text": {"context_length": 32, "width": 128, "heads": 4, "layers": 4},
}
DEFAULTS = {"batch": 32, "warmup": 1, "steps": 2, "reps": 3}
QUICK = {"batch": 16, "warmup": 1, "steps": 2, "reps": 1}
COLUMNS = (
    ("model", 10),
    ("captions", 9),
    ("precision", 10),
    ("ours samples/s", 22),
    ("OpenCLIP samples/s", 22),
    ("ours/OC", 8),
    ("ours peak MiB", 14),
    ("OC peak MiB", 13),
)


# ---------------------------------------------------------------------------------------- workers
def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_memory_window() -> float:
    """Free what earlier jobs left (to the OS, not only to malloc), reset the peak RSS to the current RSS
    (Linux: "5" into /proc/self/clear_refs) and return that RSS in MiB. The job's peak is then VmHWM."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mib("VmRSS")


def window_rate(starts: list[float], ends: list[float], warmup: int, batch: int) -> dict[str, float]:
    """Samples/s from the start of step `warmup` to the end of the last step, and the median step time."""
    timed = len(starts) - warmup
    window = ends[-1] - starts[warmup]
    steps = [e - s for s, e in zip(starts[warmup:], ends[warmup:])]
    return {
        "samples_per_s": timed * batch / window,
        "step_ms_median": 1000 * statistics.median(steps),
        "step_ms": [round(1000 * (e - s), 1) for s, e in zip(starts, ends)],  # warm-up included
    }


def describe_adamw(optimizer: Any) -> str:
    flags = optimizer.defaults
    if flags.get("fused"):
        return "fused"
    return "foreach" if flags.get("foreach") else "default (for-loop on CPU)"


class OursSide:
    """clip_train's training step: `CLIPTrainingModule` built as train.py builds it, fitted by a Lightning
    Trainer on an in-memory loader."""

    def __init__(self, threads: int) -> None:
        import logging
        import warnings

        import torch

        self.threads = threads
        torch.set_num_threads(threads)
        warnings.filterwarnings("ignore")
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        sys.path.insert(0, str(REPO))
        import pytorch_lightning  # noqa: F401  (imported once, not in the first job)

        import clip_train.training.lightning_module  # noqa: F401

        self.versions = {"torch": torch.__version__}

    def measure(self, job: dict[str, Any]) -> dict[str, Any]:
        import pytorch_lightning as pl
        import torch
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from torch.utils.data import DataLoader, Dataset

        from clip_train.checkpoints import clip_config_from_dict
        from clip_train.models import build_model

        torch.set_num_threads(self.threads)
        torch._dynamo.reset()
        data = torch.load(job["data"])
        images, tokens = data["images"], data["tokens"]
        # What our data module yields: images, tokens and the batch's info, whose "text_lengths" (each
        # caption's length up to and including its end-of-text token) the module's text length groups use.
        batches = [
            (images[k], tokens[k], {"text_lengths": ((tokens[k] == EOT_ID).int().argmax(dim=1) + 1).tolist()})
            for k in range(images.shape[0])
        ]
        total = job["warmup"] + job["steps"]

        class Batches(Dataset):
            def __len__(self) -> int:
                return total

            def __getitem__(self, i: int) -> tuple:
                return batches[i % len(batches)]

        class StepTimer(pl.Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []
                self.ends: list[float] = []
                self.losses: list[float] = []
                self.threads = 0

            def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
                self.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
                self.ends.append(time.perf_counter())
                self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
                self.threads = torch.get_num_threads()

        base = start_memory_window()
        torch.manual_seed(0)
        model = build_model(clip_config_from_dict(job["model"]))
        configs = REPO / "configs"
        adamw = OmegaConf.merge(
            OmegaConf.load(configs / "optimizer" / "adamw.yaml"),
            {"lr": job["lr"], "betas": job["betas"], "eps": job["eps"], "weight_decay": job["weight_decay"]},
        )
        schedule = OmegaConf.load(configs / "scheduler" / "warmup_cosine.yaml")
        schedule.warmup_steps = job["warmup"]
        module_cfg = OmegaConf.load(configs / "train.yaml").module  # as train.py instantiates cfg.module
        module = instantiate(
            OmegaConf.create(OmegaConf.to_container(module_cfg, resolve=True)),
            model=model,
            loss=instantiate(OmegaConf.load(configs / "loss" / "contrastive.yaml")),
            optimizer=instantiate(adamw),
            scheduler=instantiate(schedule),
            compile=job["compile"],
        )
        timer = StepTimer()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=total,
            precision="bf16-mixed" if job["precision"] == "bf16" else "32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=DataLoader(Batches(), batch_size=None))
        if len(timer.starts) != total:
            raise RuntimeError(f"ran {len(timer.starts)} steps, expected {total}")
        return {
            **window_rate(timer.starts, timer.ends, job["warmup"], job["batch"]),
            "peak_mib": _status_mib("VmHWM"),
            "base_mib": base,
            "threads": timer.threads,
            "losses": [timer.losses[0], timer.losses[-1]],
            "optimizer": describe_adamw(module.optimizers().optimizer),
            "text_length_groups": getattr(module, "text_length_groups", None),
        }


def import_openclip_parts() -> tuple[types.ModuleType, types.ModuleType, str]:
    """OpenCLIP's `model` and `loss` modules and its version, without running `open_clip/__init__.py`.

    The package's __init__ imports everything, the image transforms included, and those import torchvision,
    which is not installed here (PyPI's torchvision does not import beside this torch). So an empty module
    object takes the package's place in sys.modules, with the package's real folder as its __path__: Python
    then imports the submodules asked for (model, loss, and what they import: transformer, modified_resnet,
    utils, ...) from that folder, without executing __init__. One import on that path, `utils.py`'s
    `from torchvision.ops.misc import FrozenBatchNorm2d`, serves only freeze_batch_norm_2d (locking the
    image tower, never used here), so a stand-in module provides a class of that name that refuses to be
    built; torchvision itself is never imported. `timm` and `transformers` are optional imports in
    timm_model.py and hf_model.py and are absent here.
    """
    spec = importlib.util.find_spec("open_clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed in this environment")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "open_clip"
    sys.modules["open_clip"] = package

    class FrozenBatchNorm2dUnavailable:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("torchvision's FrozenBatchNorm2d is not available in this benchmark")

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        stand_in = types.ModuleType(name)
        stand_in.__path__ = []
        sys.modules[name] = stand_in
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2dUnavailable
    model = importlib.import_module("open_clip.model")
    loss = importlib.import_module("open_clip.loss")
    version = importlib.import_module("open_clip.version").__version__
    return model, loss, version


def openclip_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """OpenCLIP `CLIP(...)` arguments for the architecture of one of our config records (as written by
    clip_train.checkpoints.clip_config_to_dict)."""
    vision, text = dict(config["vision"]), config["text"]
    kind = vision.pop("type")
    if kind == "resnet":  # OpenCLIP recognises a ResNet by its list of stage depths, as our configs do
        vision_cfg = {k: vision[k] for k in ("image_size", "layers", "width", "head_width")}
    else:
        keys = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "patch_dropout")
        vision_cfg = {k: vision[k] for k in keys}
    text_cfg = {k: text[k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    if text["eot_token_id"] != EOT_ID:
        raise ValueError("OpenCLIP pools at the argmax of the ids: the end-of-text id must be the largest")
    if config["init_logit_bias"] is not None:
        raise ValueError("only the contrastive (softmax) loss is compared")
    return {
        "embed_dim": config["embed_dim"],
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": config["quick_gelu"],
        "init_logit_scale": config["init_logit_scale"],
        "output_dict": True,
    }


class OpenCLIPSide:
    """OpenCLIP's CLIP and ClipLoss in a loop shaped like open_clip_train's train_one_epoch. Runs in
    OpenCLIP's environment: nothing of clip_train is imported here."""

    def __init__(self, threads: int) -> None:
        import torch

        self.threads = threads
        torch.set_num_threads(threads)
        self.model_module, self.loss_module, version = import_openclip_parts()
        self.versions = {"torch": torch.__version__, "openclip": version}

    def measure(self, job: dict[str, Any]) -> dict[str, Any]:
        import torch

        torch.set_num_threads(self.threads)
        torch._dynamo.reset()
        data = torch.load(job["data"])
        images, tokens = data["images"], data["tokens"]
        base = start_memory_window()
        torch.manual_seed(0)
        model = self.model_module.CLIP(**openclip_kwargs(job["model"]))
        model.train()
        loss_fn = self.loss_module.ClipLoss()

        # open_clip_train/main.py's grouping: 1-d tensors, norms, biases, the temperature: no weight decay.
        def exempt(name: str, p: torch.Tensor) -> bool:
            return p.ndim < 2 or any(key in name for key in ("bn", "ln", "bias", "logit_scale"))

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": job["weight_decay"]},
        ]
        fused = {"fused": True} if job["openclip_fused_adamw"] else {}
        optimizer = torch.optim.AdamW(groups, lr=job["lr"], betas=job["betas"], eps=job["eps"], **fused)
        step_model = torch.compile(model) if job["compile"] else model
        bf16 = job["precision"] == "bf16"
        total, warmup, lr = job["warmup"] + job["steps"], job["warmup"], job["lr"]

        def learning_rate(step: int) -> float:  # linear warm-up, then cosine decay over the run
            if step < warmup:
                return lr * (step + 1) / warmup
            return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        starts, ends, losses = [], [], []
        for step in range(total):
            starts.append(time.perf_counter())
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            batch_images, batch_tokens = images[step % len(images)], tokens[step % len(tokens)]
            optimizer.zero_grad()
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                out = step_model(batch_images, batch_tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            ends.append(time.perf_counter())
            losses.append(float(loss.detach()))
        if "clip_train" in sys.modules:
            raise RuntimeError("the OpenCLIP worker imported clip_train")
        return {
            **window_rate(starts, ends, warmup, job["batch"]),
            "peak_mib": _status_mib("VmHWM"),
            "base_mib": base,
            "threads": torch.get_num_threads(),
            "losses": [losses[0], losses[-1]],
            "optimizer": describe_adamw(optimizer),
        }


def serve(side: str, threads: int) -> None:
    """A worker process: set up once (imports), say READY, then run one job per line of stdin, replying
    with one RESULT line each. Anything libraries print goes to stderr, the parent's log of this worker."""
    replies, sys.stdout = sys.stdout, sys.stderr
    runner = OursSide(threads) if side == "ours" else OpenCLIPSide(threads)
    hello = {**runner.versions, "python": sys.executable, "rss_mib": _status_mib("VmRSS")}
    print("READY " + json.dumps(hello), file=replies, flush=True)
    for line in sys.stdin:
        result = runner.measure(json.loads(line))
        print("RESULT " + json.dumps(result), file=replies, flush=True)


# ------------------------------------------------------------------------------ OpenCLIP environment
def ensure_openclip(venv: Path, torch_version: str, numpy_version: str) -> Path:
    """The python of a venv holding open_clip_torch==OPENCLIP_VERSION beside our torch; created or repaired
    when missing or holding other versions. Never installs an unpinned torch (it would pull CUDA)."""
    from bench_download import installed_version  # scripts/bench/, beside this file

    pins = {"torch": torch_version.split("+")[0], "numpy": numpy_version, "open_clip_torch": OPENCLIP_VERSION}
    found = {name: installed_version(venv, name) for name in pins}
    stale = {n for n, v in found.items() if v is None or v.split("+")[0] != pins[n]}
    if stale:
        wanted = ", ".join(f"{n}=={pins[n]}" for n in sorted(stale))
        had = ", ".join(f"{n} {found[n] or 'none'}" for n in sorted(stale))
        print(f"installing {wanted} into {venv} (found {had}; separate from the project's environment)")
        if not (venv / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        # torch from the pin only (a local CPU build where one is on disk); numpy is the one package the
        # model and loss modules need beyond torch. OpenCLIP without its dependencies: they include
        # torchvision, which does not import beside this torch, and timm and huggingface_hub, unused here.
        subprocess.run([*pip, f"torch=={pins['torch']}", f"numpy=={pins['numpy']}"], check=True)
        subprocess.run([*pip, "--no-deps", f"open_clip_torch=={OPENCLIP_VERSION}"], check=True)
    listing = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True).stdout
    if any(line.lower().startswith("torchvision ") for line in listing.splitlines()):
        print("note: OpenCLIP's venv holds torchvision; the worker does not import it")
    return venv / "bin" / "python"


# --------------------------------------------------------------------------------------- inputs
def model_configs() -> dict[str, dict[str, Any]]:
    """Our config records (clip_config_to_dict) of the two benchmarked models."""
    import yaml

    from clip_train.checkpoints import clip_config_to_dict
    from clip_train.models.configs import apply_overrides, get_model_config

    demo = yaml.safe_load((REPO / "configs" / "model" / "demo.yaml").read_text())
    if demo.pop("_target_") != "clip_train.models.build_model":
        raise SystemExit("configs/model/demo.yaml no longer builds with clip_train.models.build_model")
    demo_config = apply_overrides(get_model_config(demo.pop("name_or_config")), demo)
    small = apply_overrides(get_model_config("vit-tiny"), SMALL_VIT)
    return {"demo": clip_config_to_dict(demo_config), "small-vit": clip_config_to_dict(small)}


def demo_captions(n: int) -> list[str]:
    """The first n captions of the demo's crawled source (seed 0, as `make demo`)."""
    sys.path.insert(0, str(REPO / "scripts" / "demo"))
    import scenes

    return [row.text for row in scenes.source_rows(0, n)]


def web_like_tokens(n: int, context: int, seed: int) -> Any:
    """n rows `SOT ids EOT 0 ...` of random ids with log-normal lengths (median WEB_MEDIAN_LENGTH tokens,
    start and end included) clipped to [3, context]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = (math.log(WEB_MEDIAN_LENGTH) + WEB_SIGMA * normal).exp().round().clamp(3, context).long()
    out = torch.zeros(n, context, dtype=torch.int64)
    for i, length in enumerate(lengths.tolist()):
        out[i, 0] = SOT_ID
        out[i, 1 : length - 1] = torch.randint(1, SOT_ID, (length - 2,), generator=g)
        out[i, length - 1] = EOT_ID
    return out


def write_inputs(folder: Path, configs: dict[str, dict[str, Any]], batch: int) -> dict[str, Any]:
    """One file per (model, captions): seeded images and the tokenised captions, DISTINCT_BATCHES batches."""
    import torch

    from clip_train.tokenizer import Tokenizer

    n = DISTINCT_BATCHES * batch
    captions = demo_captions(n)
    files: dict[tuple[str, str], Path] = {}
    lengths: dict[tuple[str, str], list[int]] = {}
    for model, config in configs.items():
        context, size = config["text"]["context_length"], config["vision"]["image_size"]
        g = torch.Generator().manual_seed(0)
        images = torch.randn(DISTINCT_BATCHES, batch, 3, size, size, generator=g)
        for kind in ("demo", "web-like"):
            tokens = (
                Tokenizer(context_length=context)(captions)
                if kind == "demo"
                else web_like_tokens(n, context, seed=1)
            )
            # OpenCLIP reads the text features at the argmax of the ids, ours at the first end-of-text id:
            # the same position only if each row holds one end-of-text id and no larger one.
            eot = tokens == EOT_ID
            if not (eot.sum(dim=1) == 1).all() or not (tokens.argmax(dim=1) == eot.int().argmax(dim=1)).all():
                raise SystemExit(f"{model}/{kind}: a row's pooling position differs between the two")
            path = folder / f"{model}-{kind}.pt"
            torch.save({"images": images, "tokens": tokens.view(DISTINCT_BATCHES, batch, context)}, path)
            files[(model, kind)] = path
            lengths[(model, kind)] = (eot.int().argmax(dim=1) + 1).tolist()
    return {"files": files, "lengths": lengths}


# -------------------------------------------------------------------------------------------- runs
class Worker:
    """A worker process of one side, fed one job at a time; its stderr goes to a log file."""

    def __init__(self, python: Path, side: str, threads: int, folder: Path, env: dict[str, str]) -> None:
        self.side = side
        self.log_path = folder / f"{side}-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("w")
        self.cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--threads", str(threads)]
        # cwd outside the repository: nothing of the project is importable by accident on OpenCLIP's side.
        self.proc = subprocess.Popen(
            self.cmd, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True,
        )  # fmt: skip
        self.hello: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        self.hello = self._reply("READY ")
        return self.hello

    def _reply(self, prefix: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        self.log.flush()
        tail = self.log_path.read_text()[-4000:]
        raise SystemExit(f"{self.side} worker failed ({shlex.join(self.cmd)}):\n{tail}")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply("RESULT ")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def summary(results: list[dict[str, Any]]) -> tuple[float, str, str]:
    rates = [r["samples_per_s"] for r in results]
    median = statistics.median(rates)
    spread = f"{median:.1f} ({min(rates):.1f}–{max(rates):.1f})"
    peak = max(r["peak_mib"] for r in results)
    growth = max(r["peak_mib"] - r["base_mib"] for r in results)
    return median, spread, f"{peak:.0f} (+{growth:.0f})"


def print_table(rows: list[tuple[str, str, str, list[dict], list[dict]]]) -> None:
    print("\n" + "".join(f"{h:<{w}}" if i < 3 else f"{h:>{w}}" for i, (h, w) in enumerate(COLUMNS)))
    widths = [w for _, w in COLUMNS]
    for model, captions, precision, ours, theirs in rows:
        ours_median, ours_text, ours_peak = summary(ours)
        oc_median, oc_text, oc_peak = summary(theirs)
        line = "".join(f"{c:<{w}}" for c, w in zip((model, captions, precision), widths))
        values = [ours_text, oc_text, f"{ours_median / oc_median:.2f}x", ours_peak, oc_peak]
        line += "".join(f"{v:>{w}}" for v, w in zip(values, widths[3:]))
        print(line)


def length_summary(lengths: list[int]) -> str:
    ordered = sorted(lengths)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered):.0f}, p90 {p90}, max {ordered[-1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=("ours", "openclip"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["demo", "small-vit"], choices=("demo", "small-vit"))
    p.add_argument("--captions", nargs="+", default=["demo", "web-like"], choices=("demo", "web-like"))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="samples per step")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="untimed steps first")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="timed steps per measurement")
    p.add_argument("--reps", type=int, default=DEFAULTS["reps"], help="rounds, each with a fresh worker pair")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: the CPU count)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    p.add_argument(
        "--openclip-fused-adamw",
        action="store_true",
        help="give OpenCLIP the fused AdamW that ours uses (default: torch's default, as open_clip_train)",
    )
    p.add_argument("--openclip-venv", type=Path, default=Path("/tmp/venv-openclip"))
    p.add_argument("--json", type=Path, help="also write every measurement to this file")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
    )
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cores
    if args.worker:
        serve(args.worker, threads)
        return

    start = time.perf_counter()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    import torch

    sys.path.insert(0, str(REPO))
    openclip_python = ensure_openclip(
        args.openclip_venv, torch.__version__, importlib.metadata.version("numpy")
    )
    configs = {name: config for name, config in model_configs().items() if name in args.models}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    pythons = {"ours": Path(sys.executable), "openclip": openclip_python}
    rows = [
        (model, kind, precision, compiled)
        for model in configs
        for kind in args.captions
        for precision in args.precisions
        for compiled in ((False, True) if args.compile else (False,))
    ]
    runs: dict[tuple, dict[str, list[dict]]] = {row: {"ours": [], "openclip": []} for row in rows}
    hellos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_openclip_") as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder, configs, args.batch)
        print(
            f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, {args.reps} rounds, "
            f"{threads} torch threads per worker, {cores} CPU cores"
        )
        for (model, kind), lengths in inputs["lengths"].items():
            if kind in args.captions:
                print(f"caption lengths {model}/{kind} (start and end included): {length_summary(lengths)}")
        for round_ in range(args.reps):
            workers: dict[str, Worker] = {}
            try:
                for side in ("ours", "openclip"):  # both start (import) at once, then wait for both
                    workers[side] = Worker(pythons[side], side, threads, folder, env)
                for side, worker in workers.items():
                    hellos[side] = worker.wait_ready()
                for model, kind, precision, compiled in rows:
                    job = {
                        "model": configs[model],
                        "data": str(inputs["files"][(model, kind)]),
                        "precision": precision,
                        "batch": args.batch,
                        "warmup": args.warmup + (DISTINCT_BATCHES if compiled else 0),
                        "steps": args.steps,
                        "compile": compiled,
                        "lr": 1e-3,
                        "betas": [0.9, 0.98],
                        "eps": 1e-6,
                        "weight_decay": 0.2,
                        "openclip_fused_adamw": args.openclip_fused_adamw,
                    }
                    row = runs[(model, kind, precision, compiled)]
                    for side in ("ours", "openclip"):  # alternate: ours, OpenCLIP, ours, OpenCLIP, ...
                        row[side].append(workers[side].run(job))
                    print(
                        f"  round {round_ + 1}/{args.reps} {model:<10}{kind:<9}{precision}"
                        f"{'+compile' if compiled else ''}: ours {row['ours'][-1]['samples_per_s']:.1f}, "
                        f"OpenCLIP {row['openclip'][-1]['samples_per_s']:.1f} samples/s",
                        flush=True,
                    )
            finally:
                for worker in workers.values():
                    worker.close()
    table = [
        (model, kind, precision + ("+compile" if compiled else ""), r["ours"], r["openclip"])
        for (model, kind, precision, compiled), r in runs.items()
    ]
    print_table(table)
    ours, theirs = table[0][3][0], table[0][4][0]
    groups = ours["text_length_groups"]
    print(
        f"\nours: torch {hellos['ours']['torch']} ({hellos['ours']['python']}), AdamW {ours['optimizer']}, "
        f"text length groups {groups if groups is not None else 'n/a (this module has none)'}\n"
        f"OpenCLIP {hellos['openclip']['openclip']}: torch {hellos['openclip']['torch']} "
        f"({hellos['openclip']['python']}), AdamW {theirs['optimizer']}\n"
        f"torch threads seen in the workers: ours {ours['threads']}, OpenCLIP {theirs['threads']}; RSS after "
        f"the imports: ours {hellos['ours']['rss_mib']:.0f} MiB, "
        f"OpenCLIP {hellos['openclip']['rss_mib']:.0f} MiB"
    )
    print(
        "samples/s: median over the rounds (min–max) of timed samples / wall time of the timed steps; ratio: "
        "of the medians. peak MiB: the worker's peak RSS during the job (+ growth over its RSS before the "
        "model was built)."
    )
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        records = [
            {"model": m, "captions": c, "precision": p, "compile": k, **r} for (m, c, p, k), r in runs.items()
        ]
        args.json.write_text(json.dumps({"workers": hellos, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
