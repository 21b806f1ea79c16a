#!/bin/bash
# RWKV-X stage 2: everything trains, long context (64K) with context parallelism, then a LongCE phase.
# Paper recipe: ProLong-64K packed, context 64000+ (we use 65536), ~4M tokens per step, then ~1B tokens of LongCE.
# Set PHASE=longce for the LongCE phase (it resumes from the stage-2 checkpoint).
#
#   sbatch examples/train_stage1.sh            # submit
#   DRY_RUN=1 bash examples/train_stage1.sh    # print the commands it would run, run nothing
#
#SBATCH --job-name=rwkvx-stage2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=logs/%x-%j.out
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
EXTRA_ARGS=${EXTRA_ARGS:-}
# ---------------------------------------------------------------------

if [[ "${DRY_RUN:-0}" == 1 && -z "${SLURM_JOB_ID:-}" ]]; then
  SLURM_JOB_ID=dryrun; SLURM_JOB_NUM_NODES=$(grep -m1 "^#SBATCH --nodes=" "$0" | cut -d= -f2); SLURM_JOB_NODELIST="node[01-02]"; GPUS_PER_NODE=8
fi
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [[ "${DRY_RUN:-0}" == 1 ]] && ! command -v scontrol >/dev/null; then
  MASTER_ADDR=node01
else
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

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
  # LongCE runs its short-context forwards on whole sequences: no context parallelism; TP x DP only.
  CP=1
  LONGCE_TOKENS=${LONGCE_TOKENS:-1000000000}
  for i in "${!TRAIN_ARGS[@]}"; do
    [[ "${TRAIN_ARGS[$i]}" == --context-parallel-size ]] && TRAIN_ARGS[$((i+1))]=1
    [[ "${TRAIN_ARGS[$i]}" == --train-tokens ]] && TRAIN_ARGS[$((i+1))]="$LONGCE_TOKENS"
    [[ "${TRAIN_ARGS[$i]}" == --save ]] && TRAIN_ARGS[$((i+1))]="$SAVE-longce"
    [[ "${TRAIN_ARGS[$i]}" == --load ]] && TRAIN_ARGS[$((i+1))]="$SAVE-longce"
    [[ "${TRAIN_ARGS[$i]}" == --init-from ]] && TRAIN_ARGS[$((i+1))]="$SAVE"
  done
  TRAIN_ARGS+=(--loss longce --longce-window 8000 --longce-stride 4000 --longce-tau 10)
fi
# shellcheck disable=SC2206
TRAIN_ARGS+=($EXTRA_ARGS)

if [[ "$LAUNCHER" == torchrun ]]; then
  CMD=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run
       --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE"
       --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
       -m megatron_rwkvx.pretrain "${TRAIN_ARGS[@]}")
else
  CMD=(srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --export=ALL,MASTER_ADDR="$MASTER_ADDR",MASTER_PORT="$MASTER_PORT"
       "$PYTHON" -m megatron_rwkvx.pretrain "${TRAIN_ARGS[@]}")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# nodes=$NODES gpus/node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT launcher=$LAUNCHER"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

mkdir -p logs
# Slurm signals the batch shell 10 minutes before the limit; pass it on so every rank saves and
# exits 0, then requeue to continue from the checkpoint (--load = --save).
REQUEUE=0
trap 'echo "time limit near: asking ranks to checkpoint"; REQUEUE=1; kill -USR1 "$TRAIN_PID" 2>/dev/null || true' USR1
cd "$REPO"
"${CMD[@]}" &
TRAIN_PID=$!
set +e
wait "$TRAIN_PID"; STATUS=$?
# A trapped signal interrupts `wait`; wait again for the ranks' own exit (after their save).
if [[ "$REQUEUE" == 1 && "$STATUS" -gt 128 ]]; then wait "$TRAIN_PID"; STATUS=$?; fi
set -e
if [[ "$REQUEUE" == 1 ]]; then
  echo "requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
