#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (about 7 minutes on one H200):
#   1. scripts/bench/bench_training_gpu.py: ViT-B/32 bf16 samples/s, MFU and peak memory, plain at 256 per
#      GPU and gradient-cached at a 32,768 batch;
#   2. `python -m clip_train` for a few dozen steps of ViT-B/32 in bf16 under each GPU strategy config
#      (trainer=gpu, deepspeed_zero1, deepspeed_zero2, deepspeed_zero3, fsdp), on small synthetic shards,
#      validating every 15 steps on three of them (uneven over ranks where there are several); gradient caching (micro_batch_size)
#      under DDP; ZeRO-2 and FSDP reruns that must resume from the first runs' last checkpoints.
# Each training run's log and metrics.csv land in OUT_DIR; a summary table is printed at the end.
#
#   bash scripts/tools/gpu_checks.sh [OUT_DIR]        # default: gpu_checks/
#
# Budget: stops starting new runs once BUDGET_S seconds (default 500) have passed, so a slow machine still
# returns what it finished.
set -u
OUT_DIR=${1:-gpu_checks}
BUDGET_S=${BUDGET_S:-500}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
START=$(date +%s)
export PYTHONUNBUFFERED=1 CLIP_TRAIN_ROOT="$OUT_DIR/root" HYDRA_FULL_ERROR=1
SHARDS="$CLIP_TRAIN_ROOT/shards"
VAL_SHARDS="$SHARDS/shard-{000000..000002}.tar"  # three of the 16: ranks would hold uneven counts
declare -a RESULTS

elapsed() { echo $(($(date +%s) - START)); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, pytorch_lightning as pl, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', pl.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT_DIR/gpu.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== 1. bench_training_gpu ($(elapsed) s)"
  timeout 200 $PY scripts/bench/bench_training_gpu.py 2>&1 | tee "$OUT_DIR/bench_training_gpu.txt"
  RESULTS+=("bench_training_gpu: exit ${PIPESTATUS[0]}")
fi

echo "== synthetic shards ($(elapsed) s)"
[ -f "$SHARDS/manifest.json" ] || $PY - "$SHARDS" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from data_support import write_crawler_shards  # noqa: E402
print(write_crawler_shards(Path(sys.argv[1]), [768] * 16, image_size=96))
EOF

# train TAG RUN_NAME [overrides...]: 30 steps of ViT-B/32 at 256 per step on the synthetic shards; the log
# is OUT_DIR/TAG.log (a rerun of a run name gets its own tag).
train() {
  local tag=$1 name=$2; shift 2
  if [ "$(elapsed)" -gt "$BUDGET_S" ]; then RESULTS+=("$tag: NOT RUN (budget)"); return; fi
  echo "== $tag ($(elapsed) s): $*"
  local t0=$(date +%s)
  timeout 150 $PY -m clip_train model=vit_b32 logger=csv "~callbacks.progress" ++trainer.enable_progress_bar=false run_name="$name" \
    global_batch_size=256 data.train_shards="$SHARDS" data.num_workers=8 \
    trainer.max_steps=30 trainer.log_every_n_steps=5 callbacks.checkpoint.every_n_train_steps=30 \
    data.val_shards="$VAL_SHARDS" trainer.val_check_interval=15 \
    "$@" >"$OUT_DIR/$tag.log" 2>&1
  local rc=$?
  local run_dir="$CLIP_TRAIN_ROOT/runs/$name"
  local metrics; metrics=$(find "$run_dir" -name metrics.csv 2>/dev/null | sort | tail -1)
  [ -n "$metrics" ] && cp "$metrics" "$OUT_DIR/$tag.metrics.csv"
  local last; last=$($PY - "$OUT_DIR/$tag.metrics.csv" <<'EOF'
import csv, sys
try:
    table = list(csv.DictReader(open(sys.argv[1])))
    rows = [r for r in table if r.get("train/loss")]
    val = [f"{int(r['step'])}: {float(r['val/loss']):.3f}" for r in table if r.get("val/loss")]
    r = rows[-1]
    print(f"step {r.get('step')} loss {float(r['train/loss']):.3f} samples/s {float(r['train/samples_per_second']):.0f}; val/loss {', '.join(val) or 'none'}")
except Exception as e:  # no metrics: the log says why
    print(f"no metrics ({type(e).__name__})")
EOF
)
  RESULTS+=("$tag: exit $rc in $(($(date +%s) - t0)) s; $last")
  tail -3 "$OUT_DIR/$tag.log"
}

train zero2 zero2 trainer=deepspeed_zero2
train zero3 zero3 trainer=deepspeed_zero3
train fsdp fsdp trainer=fsdp
train zero1 zero1 trainer=deepspeed_zero1
# Resume: the same run name with a later max_steps continues from zero2's last checkpoint (step 30).
train zero2_resumed zero2 trainer=deepspeed_zero2 trainer.max_steps=45
train fsdp_resumed fsdp trainer=fsdp trainer.max_steps=45
grep -h -i "resuming from\|starting fresh" "$OUT_DIR/zero2_resumed.log" "$OUT_DIR/fsdp_resumed.log" | head -4
train ddp_gpu ddp_gpu trainer=gpu
train ddp_gpu_gradcache ddp_gpu_gradcache trainer=gpu micro_batch_size=64
# Gradient caching under DeepSpeed or FSDP is refused before any work (see clip_train/train.py).

echo "== summary ($(elapsed) s)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT_DIR/summary.txt"
