#!/usr/bin/env bash
# The first thing to run on a GPU machine: one prepared check, about 10 minutes on one H100 / H200.
#
#   bash profiling/gpu_check.sh [OUT_DIR]        # default runs/gpu_check-<host>-<UTC time>
#
# Stages (each with its own time limit; the sum stays under 10 minutes; a failing stage does not stop the rest):
#   env         nvidia-smi, torch / triton / flash-attn / xformers / DALI / DeepSpeed versions
#   gpu_lane    pytest -m gpu: compiled Triton vs the references on CUDA tensors (values and gradients, fp32
#               and bf16), a bf16 DiT on CUDA vs fp32 with the attention kernel checked, NVDEC decoding in the
#               training pipeline, and a short real gf_tiny run (bf16 + flash-attn + Triton + the sample step)
#   kernels     profiling/bench_kernels.py --quick --device cuda (fused providers vs eager and torch.compile)
#   train_tiny  profiling/bench_train.py gf_tiny, bf16, Triton: step phases, data wait, peak memory
#   train_dit_l profiling/bench_train.py: one DiT-L (1024-d, 24 blocks) GF step at 256x256, 8 frames, bf16
#   nccl_2rank  torchrun --nproc_per_node 2 engine/train.py gf_tiny over NCCL (only with two or more GPUs)
# Everything lands in OUT_DIR (one log per stage) and OUT_DIR/summary.md: stage, status, seconds, key lines.
# Exit status: 0 when no stage failed.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/gpu_check-$(hostname -s)-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET                       # compiled Triton, never the interpreter
export TRITON_CACHE_DIR="$OUT/triton_cache"  # a cold cache: compile times are part of the check
PY="${PYTHON:-python}"
START=$(date +%s)
FAILED=0

{
  echo "# GeoForge GPU check"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- host: $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- logs: $OUT"
  echo
  echo "| stage | status | seconds | key lines |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# stage NAME LIMIT_S KEY_REGEX CMD...: run CMD with a time limit, log to OUT/NAME.log, add a summary row
stage() {
  local name="$1" limit="$2" key="$3"; shift 3
  local log="$OUT/$name.log" t0 rc status lines
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
    *) status="FAIL (rc $rc)"; FAILED=1 ;;
  esac
  if [ $rc = 0 ]; then lines=$(grep -E "$key" "$log" | tail -n 6); else lines=$(tail -n 3 "$log"); fi
  lines=$(printf '%s' "$lines" | sed 's/|/\\|/g' | tr '\n' ' ' | cut -c1-900)
  echo "| $name | $status | $(( $(date +%s) - t0 )) | ${lines:-see $name.log} |" >> "$SUMMARY"
  echo "   -> $status in $(( $(date +%s) - t0 )) s"
}

skip() { echo "| $1 | skipped | 0 | $2 |" >> "$SUMMARY"; echo "== $1: skipped ($2)"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "| all | FAIL | 0 | torch sees no CUDA device: nothing to check |" >> "$SUMMARY"
  cat "$SUMMARY"; exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

stage env 60 "NVIDIA|torch|triton|flash|xformers|dali|deepspeed|GPU" bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed "s/^/GPU: /"
  '"$PY"' - <<PYEOF
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0))
for mod in ("triton", "flash_attn", "xformers", "nvidia.dali", "deepspeed"):
    try:
        print(mod, getattr(importlib.import_module(mod), "__version__", "?"))
    except Exception as err:
        print(mod, "NOT AVAILABLE:", type(err).__name__, str(err)[:120])
PYEOF'

# The GPU lane: every gpu-marked test (kernels, models, data, the bf16 GF run).
stage gpu_lane 240 "passed|failed|error|skipped" \
  "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/kernels tests/engine/models tests/engine/data \
  tests/engine/test_gf_training.py

if ! grep -qE "[0-9]+ passed" "$OUT/gpu_lane.log"; then   # all skipped on a GPU machine is a failure
  echo "| gpu_lane_ran | FAIL | 0 | no GPU-lane test ran (all skipped?): see gpu_lane.log |" >> "$SUMMARY"; FAILED=1
fi

stage kernels 120 "align|reproject|film_norm|total|GB/s" "$PY" profiling/bench_kernels.py --quick --device cuda --no-plot \
  --csv "$OUT/kernels.csv"

stage train_tiny 90 "step|data|peak|bench_train" "$PY" profiling/bench_train.py --recipe gf_tiny \
  --set device=cuda --set distributed.bf16=true --set backend=triton --set data.root="$OUT/data/synthetic_64" \
  --steps 16 --warmup 3 --csv "$OUT/train.csv"

stage train_dit_l 120 "step|data|peak|bench_train" "$PY" profiling/bench_train.py --recipe gf_tiny \
  --set device=cuda --set distributed.bf16=true --set backend=triton \
  --set model.size=L --set model.hidden_dim=null --set model.depth=null --set model.num_heads=null \
  --set model.camera_freqs=15 --set gf.dit_block=8 --set gf.projector_hidden=2048 --set gf.scale_hidden=1024 \
  --set data.resolution=256 --set data.frames=8 --set data.batch_size=2 --set data.synthetic_clips=8 \
  --set data.synthetic_frames=8 --set data.root="$OUT/data/synthetic_256" --steps 6 --warmup 2 \
  --csv "$OUT/train.csv"

if [ "$GPUS" -ge 2 ]; then
  stage nccl_2rank 90 "done:|error|Error|NCCL" "$PY" -m torch.distributed.run --nproc_per_node 2 \
    --master_port 29611 engine/train.py --recipe gf_tiny --run-dir "$OUT/nccl_run" \
    --set device=cuda --set distributed.bf16=true --set distributed.zero_stage=2 --set schedule.steps=5 \
    --set logging.checkpoint_every=5 --set logging.sample_steps=2 --set data.root="$OUT/data/synthetic_64"
else
  skip nccl_2rank "one GPU ($GPUS visible): no 2-rank NCCL run"
fi

{
  echo
  echo "total: $(( $(date +%s) - START )) s; $([ $FAILED = 0 ] && echo 'every stage passed' || echo 'FAILURES above')"
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
