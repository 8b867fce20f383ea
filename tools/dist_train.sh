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
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; required when NNODES > 1),
#   PORT (29500), PYTHON (the repository's .venv/bin/python where it exists, else python):
#   the interpreter to run.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

usage_unless 2 $# "CONFIG NPROC_PER_NODE [train.py options]"
CONFIG=$1
NPROC=$2
shift 2
torchrun_tool "$NPROC" train.py "$CONFIG" --launcher pytorch "$@"
