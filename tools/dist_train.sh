#!/usr/bin/env bash
# Distributed training with torchrun: any number of processes per node and nodes.
#
#   bash tools/dist_train.sh CONFIG NPROC_PER_NODE [tools/train.py options]
#
# Several machines: run the same command on each, with
#   NNODES=<machines> NODE_RANK=<0..NNODES-1> MASTER_ADDR=<address of node 0> PORT=<free port>
# e.g. two machines with 8 GPUs each:
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash tools/dist_train.sh CONFIG 8
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash tools/dist_train.sh CONFIG 8
# Without GPUs the processes use the gloo backend on the CPU.
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500),
#   PYTHON (python): the interpreter to run.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG NPROC_PER_NODE [train.py options]" >&2
  exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$PORT" \
  --nproc_per_node="$NPROC" \
  "$TOOLS/train.py" "$CONFIG" --launcher pytorch "$@"
