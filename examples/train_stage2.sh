#!/bin/bash
# RWKV-X stage 2: everything trains, long context (64K) with context parallelism, then a LongCE phase.
# Paper recipe: ProLong-64K packed, context 64000+ (we use 65536), ~4M tokens per step, then ~1B tokens of LongCE.
# Set PHASE=longce for the LongCE phase (it resumes from the stage-2 checkpoint).
#
#   sbatch examples/train_stage2.sh            # submit (from the repository: the log goes to the submit directory)
#   DRY_RUN=1 bash examples/train_stage2.sh    # print the commands it would run, run nothing
#
#SBATCH --job-name=rwkvx-stage2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# In the submit directory: Slurm opens it before the script runs, so a folder made by the script
# (or one missing) would leave the job without a log.
#SBATCH --output=%x-%j.out
# Site-specific: remove one '#' to use.
##SBATCH --partition=<partition>
##SBATCH --account=<account>
set -euo pipefail

# ---------------- everything you may want to change ----------------
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python}
DATA_PATH=${DATA_PATH:-"$REPO/data/prolong64k_text_document"}   # tools/preprocess_data.py --pack-length 65536
TOKENIZER_TYPE=${TOKENIZER_TYPE:-RWKVWorldTokenizer}
INIT_FROM=${INIT_FROM:-"$REPO/checkpoints/rwkvx-0.2b-stage1"}  # the stage-1 checkpoint
SAVE=${SAVE:-"$REPO/checkpoints/rwkvx-0.2b-stage2"}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-"$REPO/runs/stage2"}
TP=${TP:-2}; PP=${PP:-1}; CP=${CP:-4}
SEQ_LENGTH=${SEQ_LENGTH:-65536}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
TRAIN_TOKENS=${TRAIN_TOKENS:-10000000000}
LR=${LR:-1e-5}
LAUNCHER=${LAUNCHER:-srun}          # srun: one task per GPU (signals reach every rank); torchrun: one agent per node
MASTER_PORT=${MASTER_PORT:-29500}
# Containers through pyxis/enroot (srun --container-image/--container-mounts), e.g. the image
# built from docker/: CONTAINER_IMAGE=/shared/rwkvx.sqsh CONTAINER_MOUNTS=/data:/data,/ckpt:/ckpt
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
# ---------------------------------------------------------------------

# shellcheck source=examples/slurm_common.sh
source "$REPO/examples/slurm_common.sh"
slurm_layout

TRAIN_ARGS=(
  --init-from "$INIT_FROM" --train-only all --sequence-parallel
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --train-tokens "$TRAIN_TOKENS" --lr "$LR" --min-lr "$LR" --lr-decay-style constant --lr-warmup-iters 10
  --adam-beta1 0.9 --adam-beta2 0.99 --adam-eps 1e-18 --weight-decay 0.001 --clip-grad 1.0 --bf16
  --data-path "$DATA_PATH" --split 998,1,1 --tokenizer-type "$TOKENIZER_TYPE"
  --save "$SAVE" --load "$SAVE" --save-interval 1000 --eval-interval 1000 --eval-iters 10
  --log-interval 10 --tensorboard-dir "$TENSORBOARD_DIR" --device cuda
)
PHASE=${PHASE:-main}
if [[ "$PHASE" == longce ]]; then
  # LongCE keeps the layout: its short-context windows are spread over the CP ranks.
  LONGCE_TOKENS=${LONGCE_TOKENS:-1000000000}
  for i in "${!TRAIN_ARGS[@]}"; do
    [[ "${TRAIN_ARGS[$i]}" == --train-tokens ]] && TRAIN_ARGS[$((i+1))]="$LONGCE_TOKENS"
    [[ "${TRAIN_ARGS[$i]}" == --save ]] && TRAIN_ARGS[$((i+1))]="$SAVE-longce"
    [[ "${TRAIN_ARGS[$i]}" == --load ]] && TRAIN_ARGS[$((i+1))]="$SAVE-longce"
    [[ "${TRAIN_ARGS[$i]}" == --init-from ]] && TRAIN_ARGS[$((i+1))]="$SAVE"
  done
  TRAIN_ARGS+=(--loss longce --longce-window 8000 --longce-stride 4000 --longce-tau 10)
fi
# shellcheck disable=SC2206
TRAIN_ARGS+=($EXTRA_ARGS)

slurm_launch
