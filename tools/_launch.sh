# Shared by tools/dist_{train,test}.sh and tools/slurm_{train,test}.sh: sourced, not run.
#
# Environment: PYTHON (the repository's .venv/bin/python where it exists, else python):
#   the interpreter. torchrun: NNODES (1), NODE_RANK (0),
#   MASTER_ADDR (127.0.0.1; required when NNODES > 1), PORT (29500). Slurm: GPUS (8, total),
#   GPUS_PER_NODE (GPUS up to 8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun options), PORT
#   (exported as MASTER_PORT, the rendezvous port on the first node; mmengine's default
#   29500 where neither is set).

TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$TOOLS/../.venv/bin/python" ]]; then PYTHON="$TOOLS/../.venv/bin/python"; else PYTHON=python; fi
fi
# mmrest and the configs' custom imports resolve from the repository without installing
export PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}"

# usage_unless MIN_ARGS GIVEN USAGE: exit 2 with USAGE when fewer than MIN_ARGS arguments
usage_unless() {
  if [[ $2 -lt $1 ]]; then
    echo "usage: $0 $3" >&2
    exit 2
  fi
}

# torchrun_tool NPROC_PER_NODE SCRIPT [ARGS...]: tools/SCRIPT ARGS in NPROC_PER_NODE
# processes on each of NNODES machines
torchrun_tool() {
  local nproc=$1 script=$2
  shift 2
  if [[ "${NNODES:-1}" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
    echo "$0: NNODES=$NNODES needs MASTER_ADDR, the address of the node with NODE_RANK=0" >&2
    exit 2
  fi
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$nproc" \
    "$TOOLS/$script" "$@"
}

# slurm_tool PARTITION JOB_NAME SCRIPT [ARGS...]: tools/SCRIPT ARGS as GPUS Slurm tasks,
# one per GPU
slurm_tool() {
  local partition=$1 job_name=$2 script=$3
  shift 3
  # a job of fewer than 8 GPUs asks each node for no more than it uses
  local gpus=${GPUS:-8}
  local per_node=${GPUS_PER_NODE:-$(( gpus < 8 ? gpus : 8 ))}
  if [[ -n "${PORT:-}" ]]; then export MASTER_PORT="$PORT"; fi
  # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
  exec srun -p "$partition" \
    --job-name="$job_name" \
    --gres="gpu:$per_node" \
    --ntasks="$gpus" \
    --ntasks-per-node="$per_node" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} \
    "$PYTHON" -u "$TOOLS/$script" "$@"
}
