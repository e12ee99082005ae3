"""The GPU training benchmark's logic, on the CPU: its table, its FLOP count and its no-GPU exit."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_train.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "bench" / "bench_training_gpu.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_training_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the script loads
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cpu_run_prints_both_configurations_with_finite_mfu() -> None:
    # A nominal 1 GFLOP/s peak makes the CPU's MFU column a number rather than n/a (or 0.0%); no warm-up,
    # as the timings need not be good, only present.
    args = ["--device", "cpu", "--model", "vit-tiny", "--batch", "8", "--cache-batch", "32"]
    proc = _run(*args, "--steps", "1", "--cache-steps", "1", "--warmup", "0", "--peak-tflops", "0.001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {
        line.split("  ")[0]: line.split()
        for line in proc.stdout.splitlines()
        if line.startswith(("plain step", "gradient cache"))
    }
    assert set(rows) == {"plain step", "gradient cache"}, proc.stdout
    for label, cells in rows.items():
        batch, micro, steps, step_s, rate, tflops, mfu, peak = cells[-8:]
        expected = ("8", "8", "1") if label == "plain step" else ("32", "8", "1")
        assert (batch, micro, steps) == expected
        assert float(rate) > 0 and math.isfinite(float(step_s))
        assert mfu.endswith("%") and 0 < float(mfu[:-1]) < math.inf and math.isfinite(float(tflops))
        assert peak == "n/a"  # no CUDA allocator to ask
    assert "× 4 with gradient caching" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("done: 2 configuration(s) of vit-tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_it_says_how_to_run_on_cpu_and_exits_0() -> None:
    proc = _run()
    assert proc.returncode == 0
    assert proc.stdout.count("\n") == 1 and "--device cpu --model vit-tiny --quick" in proc.stdout


@pytest.mark.parametrize("name", ["vit-tiny", "ViT-B/32", "ViT-B/16"])
def test_analytic_forward_flops_match_torchs_flop_counter(name: str) -> None:
    bench = _load_script()
    with torch.device("meta"):
        model = build_model(name)
        images = torch.empty(1, 3, model.image_size, model.image_size)
        tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model.visual(images)
        model.text(tokens)
    # The counter counts the same matmuls, convolution and attention products; norms and activations
    # are in neither count.
    assert bench.forward_flops_per_sample(model) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_peak_lookup_tells_sxm_from_pcie() -> None:
    bench = _load_script()
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops_for("Tesla T4") is None
