#!/usr/bin/env bash
# The one prepared run for a lent GPU (issues "A generator that draws what the prompt says", item 4, and
# "A few-step student ...", the GPU benchmark). About 8 minutes on an H200:
#   1. the shapes world's data (generate_data.py);
#   2. a design's UNet + text encoder (DESIGN, default latent-f2-film-text, the f=2 design that on CPU coloured
#      its objects as prompted after 6 CPU-minutes: see the README's design study) on the shipped f=2 autoencoder
#      (models/shapes-vae-f2),
#      bf16 autocast, batch 256, for TRAIN_MIN minutes, with EMA snapshots at SNAPS process-CPU-minutes (one
#      torch thread, so these are close to wall minutes: the thread waits on the GPU);
#   3. the oracle's learning curve of those snapshots (train_diffusion.py curve, on the GPU);
#   4. bench.py's SD 2.1-architecture part at 512 px (fp32 one-image calls vs bf16/fp16 + SDPA + batching).
# Results land in $OUT (the device tool's folder; default outputs/gpu_run): train.log, pipeline.tar (the final
# pipeline and its snapshots' scores), results.tar (outputs/learning_curve/gpu, outputs/bench/gpu).
#
# The device machine has torch but no diffusers; carry the wheels (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   then: run(command="bash gpu_run.sh", carry=[".whl"], timeout_s=600)
# A CPU dry run of the same steps (about 5 minutes; encoding the latents takes the first 1-2):
#   DEVICE=cpu DTYPE=float32 TRAIN_MIN=3 BATCH=8 SNAPS=0.2,0.5 N_PROMPTS=4 SD21_SCALE=tiny OUT=/tmp/gpu_dry \
#     PYTHON=.venv/bin/python bash gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")"
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} TRAIN_MIN=${TRAIN_MIN:-5} BATCH=${BATCH:-256}
SNAPS=${SNAPS:-1,2,3,4} N_PROMPTS=${N_PROMPTS:-200} SD21_SCALE=${SD21_SCALE:-full} PYTHON=${PYTHON:-python3}
DESIGN=${DESIGN:-latent-f2-film-text} TRAIN_FLAGS=${TRAIN_FLAGS:-}  # e.g. TRAIN_FLAGS="--attn-levels 3"
INIT_VAE=${INIT_VAE:-models/shapes-vae-f2} CKPT=${CKPT:-checkpoints/gpu/$DESIGN}
OUT=${OUT:-outputs/gpu_run}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline MPLBACKEND=Agg PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: diffusers is missing and no .whl/ was carried" >&2; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/train.log"
{
    [ -f data/shapes/data.pkl ] || "$PYTHON" generate_data.py
    # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
    "$PYTHON" train_diffusion.py --design "$DESIGN" $TRAIN_FLAGS --init-vae "$INIT_VAE" --device "$DEVICE" \
        --dtype "$DTYPE" --batch-size "$BATCH" --lr-schedule constant --threads 1 --max-steps 10000000 \
        --max-minutes "$TRAIN_MIN" --snapshot-cpu-minutes "$SNAPS" --sample-every 0 \
        --ckpt-dir "$CKPT" --out "$CKPT/final"
    "$PYTHON" train_diffusion.py curve --ckpt-dir "$CKPT" --device "$DEVICE" --n-prompts "$N_PROMPTS" \
        --run-name gpu
    "$PYTHON" bench.py --only sd21 --sd21-scale "$SD21_SCALE" --run-name gpu
} 2>&1 | tr '\r' '\n' | grep -v -E '[0-9]+%\|' | tee -a "$OUT/train.log"
tar -cf "$OUT/pipeline.tar" -C "$CKPT" final $(cd "$CKPT" && ls -d snapshots/*/snapshot.json snapshots/*/oracle-*.json)
tar -cf "$OUT/results.tar" outputs/learning_curve/gpu outputs/bench/gpu
ls -la "$OUT"
