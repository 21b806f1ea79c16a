#!/bin/bash
# RWKV-X stage 1: only the inserted sparse-attention blocks train; the RWKV-7 base stays frozen.
# Paper recipe: context 1024, constant lr 1e-5 after 10 warm-up steps, AdamW (0.9, 0.99), eps 1e-18,
# weight decay 0.001 on matrices, clip 1.0, bf16.
#
#   sbatch examples/train_stage1.sh            # submit (from the repository: the log goes to the submit directory)
#   DRY_RUN=1 bash examples/train_stage1.sh    # print the commands it would run, run nothing
#
#SBATCH --job-name=rwkvx-stage1
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
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
DATA_PATH=${DATA_PATH:-"$REPO/data/minipile_text_document"}   # from tools/preprocess_data.py
TOKENIZER_TYPE=${TOKENIZER_TYPE:-RWKVWorldTokenizer}
INIT_FROM=${INIT_FROM:-"$REPO/checkpoints/rwkvx-0.2b-expanded"}  # tools/convert_rwkv7_to_rwkvx.py --output-format megatron
SAVE=${SAVE:-"$REPO/checkpoints/rwkvx-0.2b-stage1"}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-"$REPO/runs/stage1"}
TP=${TP:-1}; PP=${PP:-1}; CP=${CP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
TRAIN_TOKENS=${TRAIN_TOKENS:-1500000000}
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
  --init-from "$INIT_FROM" --train-only sparse
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --train-tokens "$TRAIN_TOKENS" --lr "$LR" --min-lr "$LR" --lr-decay-style constant --lr-warmup-iters 10
  --adam-beta1 0.9 --adam-beta2 0.99 --adam-eps 1e-18 --weight-decay 0.001 --clip-grad 1.0 --bf16
  --data-path "$DATA_PATH" --split 998,1,1 --tokenizer-type "$TOKENIZER_TYPE"
  --save "$SAVE" --load "$SAVE" --save-interval 1000 --eval-interval 1000 --eval-iters 10
  --log-interval 10 --tensorboard-dir "$TENSORBOARD_DIR" --device cuda
)
# shellcheck disable=SC2206
TRAIN_ARGS+=($EXTRA_ARGS)

slurm_launch
