#!/bin/bash
# llamajobs 0.1.0: per-node launch of run qwen2.5-7b-full-fsdp.
# SLURM runs this once on every node (one task per node); it starts a static torchrun rendezvous
# whose head is resolved here, on the compute node, never on the login node.
set -euo pipefail
# Run dirs, checkpoints and logs are never world-writable, whatever the submitting shell's umask.
umask 022
module load cuda/12.1
source /shared/venvs/llamajobs/bin/activate
RUN_DIR=/shared/llamajobs/runs/1-qwen2.5-7b-full-fsdp
# Passed through by name from the submitting shell; values are never written into scripts.
export WANDB_API_KEY HF_TOKEN
export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    # The node launcher passes the allocation's hosts; by hand (job.sbatch) scontrol expands them.
    HOSTS=${LLAMAJOBS_HOSTS:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')}
    HEAD=${HOSTS%% *}
    # A node name that does not resolve here (a test cluster's n1, a site without DNS for node names):
    # the controller knows its address.
    if ! getent hosts "$HEAD" >/dev/null 2>&1; then
        ADDR=$(scontrol show node "$HEAD" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
        HEAD=${ADDR:-$HEAD}
    fi
    NNODES=$SLURM_NNODES
    NODE_RANK=$SLURM_NODEID
    # Derived from the job id, so jobs sharing a node never collide.
    PORT=${LLAMAJOBS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # srun (22.05+) no longer inherits --cpus-per-task from the allocation.
    export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-}
else
    HOSTS=localhost
    HEAD=127.0.0.1
    NNODES=1
    NODE_RANK=0
    PORT=${LLAMAJOBS_PORT:?the local launcher sets LLAMAJOBS_PORT}
fi

# One worker per GPU on the node; two on a CPU-only node.
if ! nvidia-smi -L >/dev/null 2>&1; then
    PROCS=2
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    PROCS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
    PROCS=$(nvidia-smi -L | grep -c '^GPU')
fi

CPUS=$(nproc)
# torchrun sets OMP_NUM_THREADS=1; CPU Adam and the CPU workers want their share of the cores.
export OMP_NUM_THREADS=$(( CPUS / PROCS > 0 ? CPUS / PROCS : 1 ))
# Compiled extensions and Triton kernels on node-local disk: a shared home chokes on their locks.
NODE_CACHE="${TMPDIR:-/tmp}/llamajobs-$UID"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$NODE_CACHE/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$NODE_CACHE/triton}

ATTEMPT=${SLURM_RESTART_COUNT:-${LLAMAJOBS_ATTEMPT:-0}}
LOG_DIR=$RUN_DIR/logs/attempt-$ATTEMPT/node-$NODE_RANK
mkdir -p "$LOG_DIR"
hostname > "$LOG_DIR/host"  # so `status` can name the host of a failing rank

exec python -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$PROCS" \
    --master-addr "$HEAD" --master-port "$PORT" --max-restarts 0 \
    --log-dir "$LOG_DIR" --redirects 3 --tee 3 \
    -m llamajobs.worker "$RUN_DIR"
