# Shared by train_stage1.sh and train_stage2.sh (sourced from $REPO/examples, since sbatch runs a
# copy of the job script from its spool directory).

# Where the job runs: the node list, GPUs per node and the rendezvous host (the first node).
slurm_layout() {
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
}

# Build the launch command for TRAIN_ARGS, print it (DRY_RUN=1) or run it with the time-limit
# signal turned into save + exit 0 + requeue.
slurm_launch() {
  # megatron-core's tensor-parallel layers (with --sequence-parallel) and its overlapped gradient
  # reduction overlap communication with compute only when the GPU runs kernels in launch order:
  # one hardware queue (megatron-core's linear layers warn otherwise). As Megatron-LM's examples.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  SRUN_OPTS=(--kill-on-bad-exit=1)
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then SRUN_OPTS+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO"); fi
  if [[ -n "${CONTAINER_MOUNTS:-}" ]]; then SRUN_OPTS+=(--container-mounts="$CONTAINER_MOUNTS"); fi
  if [[ "$LAUNCHER" == torchrun ]]; then
    CMD=(srun "${SRUN_OPTS[@]}" --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run
         --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE"
         --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
         -m megatron_rwkvx.pretrain "${TRAIN_ARGS[@]}")
  else
    CMD=(srun "${SRUN_OPTS[@]}" --ntasks-per-node="$GPUS_PER_NODE" --export=ALL,MASTER_ADDR="$MASTER_ADDR",MASTER_PORT="$MASTER_PORT"
         "$PYTHON" -m megatron_rwkvx.pretrain "${TRAIN_ARGS[@]}")
  fi

  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# nodes=$NODES gpus/node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT launcher=$LAUNCHER" \
         "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"
    printf '%q ' "${CMD[@]}"; echo
    exit 0
  fi

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
}
