"""Training speed of CLIP on one GPU: samples/s, model FLOPs utilisation and peak memory, side by side for
a plain step at the per-GPU batch and an exact gradient-cached step at a large contrastive batch.

Everything runs in this one process on synthetic data made on the device (random images, random token
rows each ending in an end-of-text token): no shards, no downloads, no data-loader, so the numbers are
those of the model, the loss and the optimiser alone. Each configuration builds a fresh model and AdamW
(fused, the CLIP paper's hyper-parameters, weight decay on weight matrices only), runs a few warm-up steps,
then times steps to the device's completion.

    python scripts/bench/bench_training_gpu.py                       # ViT-B/32, bf16, 256 and 32,768
    python scripts/bench/bench_training_gpu.py --quick               # fewer steps
    python scripts/bench/bench_training_gpu.py --device cpu --model vit-tiny --quick   # CPU smoke run

Without a CUDA device and with `--device cuda` (the default) it says so in one line and exits 0, so that
`make bench` passes on CPU machines.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from clip_train.losses import DEFAULT_CHUNK_SIZE, ContrastiveLoss  # noqa: E402
from clip_train.models import CLIP, CLIPConfig, VisionTransformerConfig, build_model  # noqa: E402
from clip_train.models.configs import TextTransformerConfig, get_model_config  # noqa: E402
from clip_train.training.gradient_cache import gradient_cached_step  # noqa: E402
from clip_train.training.optim import parameter_groups  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched against
# torch.cuda.get_device_name() in this order: the PCIe and NVL variants run at lower clocks and power
# than the SXM parts, whose names carry no suffix.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756.0),
    ("NVL", 835.0),  # H100 NVL and H200 NVL
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
# How many forward passes' worth of FLOPs one training sample costs: backward ≈ 2 × forward, and
# gradient caching encodes every micro-batch twice (once without a graph, once with).
FORWARDS_PER_SAMPLE = {"plain": 3, "cache": 4}
WIDTHS = (16, 8, 7, 7, 9, 11, 9, 8, 10)


# ------------------------------------------------------------------------------------------ model FLOPs


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Multiply-accumulates of `layers` pre-LN blocks over one sequence of `tokens` tokens."""
    hidden = round(width * mlp_ratio)
    projections = 4 * width * width + 2 * width * hidden  # qkv (3w²) + out (w²) + the two MLP layers
    # QKᵀ and attention · V, counted in full for causal attention too (the usual MFU convention).
    attention = 2 * tokens * tokens * width
    return layers * (tokens * projections + attention)


def vision_transformer_macs(config: VisionTransformerConfig, embed_dim: int) -> int:
    """Forward multiply-accumulates of the ViT image tower for one image in training (patch dropout on)."""
    patches = config.grid_size**2
    if config.patch_dropout > 0:  # the tower keeps this many patches in training, see drop_patches
        patches = max(1, int(patches * (1.0 - config.patch_dropout)))
    patch_embedding = config.grid_size**2 * 3 * config.patch_size**2 * config.width
    tokens = patches + 1  # the class token
    blocks = _transformer_macs(tokens, config.width, config.layers, config.mlp_ratio)
    return patch_embedding + blocks + config.width * embed_dim


def text_transformer_macs(config: TextTransformerConfig, embed_dim: int) -> int:
    """Forward multiply-accumulates of the text tower for one full-length (context_length) token row; the
    token embedding is a lookup and costs none."""
    blocks = _transformer_macs(config.context_length, config.width, config.layers, config.mlp_ratio)
    return blocks + config.width * embed_dim


def forward_flops_per_sample(model: CLIP) -> int:
    """Forward FLOPs (2 × multiply-accumulates) of both towers for one image-text pair.

    ViT towers are counted analytically from the config; a ResNet image tower, whose stage shapes make the
    algebra long, is counted by running it once on the meta device under torch's FLOP counter.
    """
    config: CLIPConfig = model.config
    text = 2 * text_transformer_macs(config.text, config.embed_dim)
    if isinstance(config.vision, VisionTransformerConfig):
        return 2 * vision_transformer_macs(config.vision, config.embed_dim) + text
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        visual = build_model(config).visual
        images = torch.empty(1, 3, config.vision.image_size, config.vision.image_size)
    with FlopCounterMode(display=False) as counter:
        visual(images)
    return int(counter.get_total_flops()) + text


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU (TFLOP/s), or None."""
    upper = device_name.upper()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in upper), None)


# ------------------------------------------------------------------------------------------ the steps


def synthetic_batch(model: CLIP, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(size, 3, S, S) fp32 normal images — the dtype the data module hands over — and (size, L) token rows
    of random length, each with its end-of-text token and zero padding after it, made on the device."""
    text = model.config.text
    length = text.context_length
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(size, 3, model.image_size, model.image_size, device=device, generator=generator)
    tokens = torch.randint(0, text.eot_token_id, (size, length), device=device, generator=generator)
    ends = torch.randint(1, length, (size,), device=device, generator=generator)  # eot position, (size,)
    positions = torch.arange(length, device=device)
    tokens = tokens.masked_fill(positions[None, :] > ends[:, None], 0)
    tokens[torch.arange(size, device=device), ends] = text.eot_token_id
    return images, tokens


@dataclass
class Result:
    label: str
    batch: int
    micro: int
    steps: int
    step_s: float = math.nan  # median over the timed steps
    samples_per_s: float = math.nan
    model_tflops: float = math.nan  # achieved model FLOP/s, in TFLOP/s
    mfu: float | None = None  # fraction of the device's peak; None when no peak is known
    peak_gib: float | None = None  # None off CUDA
    loss: float = math.nan
    error: str | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_configuration(
    label: str,
    model_name: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    micro: int,
    warmup: int,
    steps: int,
    forward_flops: int,
    peak_tflops: float | None,
) -> Result:
    """Build a fresh model and optimiser, run `warmup` untimed and `steps` timed optimiser steps on one
    synthetic batch of `batch` pairs (exact gradient caching with micro-batches of `micro` when smaller)."""
    result = Result(label, batch, micro, steps)
    cache = micro < batch
    gc.collect()  # a failed configuration's tensors may still be held by reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    # The CLIP paper's AdamW (configs/optimizer/adamw.yaml); its state is part of the memory a run needs.
    groups = parameter_groups(model, weight_decay=0.2, no_decay_names=model.no_weight_decay_param_names())
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    # The chunked loss of configs/loss/contrastive_chunked.yaml: at 32,768 the plain loss's logits alone
    # would be 4 GiB, and at 256 the chunked loss is a single block, i.e. the plain one.
    loss_fn = ContrastiveLoss(chunk_size=DEFAULT_CHUNK_SIZE, check_finite=False)
    images, tokens = synthetic_batch(model, batch, device)
    # Autocast over the whole step, as Lightning's bf16-mixed does around training_step; the loss turns it
    # off for its own fp32 arithmetic.
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if cache:
                output = gradient_cached_step(model, loss_fn, images, tokens, micro)
            else:
                encoded = model(images, tokens)
                output = loss_fn(
                    encoded.image_embeds, encoded.text_embeds, encoded.logit_scale, encoded.logit_bias
                )
                output.loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        return output.loss.detach()

    times = []
    try:
        for i in range(warmup + steps):
            _synchronize(device)
            start = time.perf_counter()
            loss = step()
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            print(f"  {label}: step {i + 1}/{warmup + steps} {time.perf_counter() - start:.3f} s", flush=True)
        result.loss = float(loss)
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
    except RuntimeError as error:  # one failed configuration must not cost the other its row
        traceback.print_exc()
        result.error = f"failed: {str(error).splitlines()[0][:60]}"
    if times:
        result.step_s = statistics.median(times)
        result.samples_per_s = batch / result.step_s
        achieved = FORWARDS_PER_SAMPLE["cache" if cache else "plain"] * forward_flops * result.samples_per_s
        result.model_tflops = achieved / 1e12
        result.mfu = None if peak_tflops is None else result.model_tflops / peak_tflops
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result  # the model, optimiser and batch go with this frame, before the next configuration


# ------------------------------------------------------------------------------------------ the program


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it; fp32 on the CPU, where bf16 autocast is slower than fp32 on most
    processors (ask for it with --precision bf16)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _cell(value: float | None, spec: str, width: int) -> str:
    text = "n/a" if value is None or not math.isfinite(value) else format(value, spec)
    return f"{text:>{width}}"


def print_table(results: list[Result]) -> None:
    header = ("configuration", "batch", "micro", "steps", "step s", "samples/s", "TFLOP/s", "MFU", "peak GiB")
    print("\n" + "".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS))))
    for r in results:
        row = f"{r.label:<{WIDTHS[0]}}{r.batch:>{WIDTHS[1]}}{r.micro:>{WIDTHS[2]}}{r.steps:>{WIDTHS[3]}}"
        if r.error:
            print(f"{row}  {r.error}")
            continue
        mfu = None if r.mfu is None else 100 * r.mfu
        print(
            row
            + _cell(r.step_s, ".3f", WIDTHS[4])
            + _cell(r.samples_per_s, ".1f", WIDTHS[5])
            + _cell(r.model_tflops, ".2f", WIDTHS[6])
            + (_cell(mfu, ".1f", WIDTHS[7] - 1) + "%" if mfu is not None else _cell(None, "", WIDTHS[7]))
            + _cell(r.peak_gib, ".2f", WIDTHS[8])
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B/32", help="a registered model name (clip_train.models)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--batch", type=int, help="batch of the plain step (default 256; 16 on a CPU with --quick)"
    )
    parser.add_argument(
        "--cache-batch",
        type=int,
        help="global batch of the gradient-cached step (default 32768; 64 on a CPU with --quick); 0 skips it",
    )
    parser.add_argument("--micro-batch", type=int, help="gradient-caching micro-batch (default: --batch)")
    parser.add_argument("--steps", type=int, help="timed steps of the plain configuration (20; 5 quick)")
    parser.add_argument("--cache-steps", type=int, help="timed steps of the gradient-cached one (2; 1 quick)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps first (3; 1 quick; at most 1 for gradient caching)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (and on a CPU small batches)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense peak in TFLOP/s for MFU (default: looked up for H100/H200/A100)",
    )
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_training_gpu: needs a CUDA GPU, none found; for the CPU smoke version run "
            "python scripts/bench/bench_training_gpu.py --device cpu --model vit-tiny --quick"
        )
        return 0
    small = device.type == "cpu" and args.quick
    batch = args.batch or (16 if small else 256)
    cache_batch = (64 if small else 32768) if args.cache_batch is None else args.cache_batch
    micro = args.micro_batch or batch
    steps = args.steps or (5 if args.quick else 20)
    cache_steps = args.cache_steps or (1 if args.quick else 2)
    warmup = (1 if args.quick else 3) if args.warmup is None else args.warmup
    if min(batch, micro, steps, cache_steps) < 1 or warmup < 0 or cache_batch < 0:
        parser.error("batch sizes and step counts must be positive (warm-up and --cache-batch may be 0)")
    if cache_batch and cache_batch <= micro:
        parser.error(f"--cache-batch {cache_batch} must exceed the micro-batch {micro} to cache anything")

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops_for(name)
        if peak is None:
            parser.error(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak in TFLOP/s)")
    dtype = resolve_dtype(args.precision, device)
    with torch.device("meta"):
        forward_flops = forward_flops_per_sample(build_model(args.model))

    print(
        f"{args.model} on {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}; "
        f"forward {forward_flops / 1e9:.3g} GFLOP per pair; peak "
        + (f"{peak:g} TFLOP/s" if peak else "unknown (MFU n/a; pass --peak-tflops)")
    )
    configurations = [("plain step", batch, batch, warmup, steps)]
    if cache_batch:
        configurations.append(("gradient cache", cache_batch, micro, min(warmup, 1), cache_steps))
    print(
        "will run: "
        + "; ".join(f"{label} at {b} ({w} warm-up + {s} timed steps)" for label, b, _, w, s in configurations)
    )
    started = time.perf_counter()
    results = [
        run_configuration(label, args.model, device, dtype, b, m, w, s, forward_flops, peak)
        for label, b, m, w, s in configurations
    ]
    print_table(results)
    image_kib = 3 * get_model_config(args.model).vision.image_size ** 2 * 4 / 1024
    peak_text = f"the dense peak, {peak:g} TFLOP/s" if peak else "the device's peak (unknown here, so n/a)"
    print(
        "\nsamples/s: image-text pairs per second of optimiser-step time on this one device (median of "
        "the timed steps).\n"
        f"model FLOPs: {forward_flops / 1e9:.3g} GFLOP forward per pair = 2 × the multiply-accumulates "
        "of both towers (matmuls,\n"
        "  patch embedding, attention counted in full even where causal; norms, activations and the loss "
        "left out);\n"
        "  × 3 per pair for a plain training step (backward ≈ 2 × forward), × 4 with gradient caching "
        "(every\n  micro-batch is encoded twice).\n"
        f"TFLOP/s: achieved model FLOP/s; MFU: that ÷ {peak_text}.\n"
        "peak GiB: torch.cuda.max_memory_allocated per configuration (reset between); model, AdamW state "
        f"and the\n  input batch ({image_kib:.0f} KiB of fp32 image per pair) included."
    )
    failed = [r.label for r in results if r.error]
    print(
        f"done: {len(results)} configuration(s) of {args.model} in {time.perf_counter() - started:.1f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
