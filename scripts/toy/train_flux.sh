#!/usr/bin/env bash
# Train the toy FLUX: the VAE first (skipped once $RUN/vae/model exists), then the DiT, which
# resumes bit-exactly from $RUN/dit/ckpt.{safetensors,json} when one exists (else it starts fresh).
# Starting and resuming are the same command; see scripts/toy/FLUX_TRAINING.md.
#
#   DITLOC_SRC=toy_training/runs/flux/src_86f5613 setsid nohup nice -n 19 scripts/toy/train_flux.sh \
#       >> toy_training/runs/flux/driver.log 2>&1 < /dev/null &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-toy_training/runs/flux}
STEPS=${STEPS:-13000}        # DiT total steps
VAE_STEPS=${VAE_STEPS:-1800}
POOL=${POOL:-100000}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
# The toy world (ditloc.toy.world) decides the training data: pin ditloc to a snapshot (git archive of a
# commit's src/) so that a resume draws the same data even while src/ is being edited.
if [ -n "${DITLOC_SRC:-}" ]; then export PYTHONPATH="$(realpath "$DITLOC_SRC")${PYTHONPATH:+:$PYTHONPATH}"; fi
mkdir -p "$RUN/dit"
echo "== $(date -Is) train_flux.sh pid $$ (ditloc from $($PY -c 'import ditloc; print(ditloc.__file__)' 2>/dev/null))"
if [ ! -f "$RUN/vae/model/config.json" ]; then
  $PY scripts/toy/train_vae.py --levels 2 --latent-channels 4 --shift-factor --steps "$VAE_STEPS" --batch 32 \
      --lr 1e-3 --seed 0 --threads "$THREADS" --out "$RUN/vae"
fi
$PY scripts/toy/train_dit.py --family flux --steps "$STEPS" --pool "$POOL" --batch 32 --lr 3e-4 --warmup 500 \
    --object-weight 4 --id-loss 0.1 --seed 0 --threads "$THREADS" --ckpt-every 250 --keep-every 1000 \
    --log-every 50 --vae "$RUN/vae/model" --out "$RUN/dit" --resume >> "$RUN/dit/log.txt"
echo "== $(date -Is) done"
