#!/usr/bin/env bash
# Distributed evaluation with torchrun: any number of processes per node and nodes.
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT NPROC_PER_NODE [tools/test.py options]
#
# Several machines: as tools/dist_train.sh (NNODES, NODE_RANK, MASTER_ADDR, PORT).
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; required when NNODES > 1),
#   PORT (29500), PYTHON (the repository's .venv/bin/python where it exists, else python):
#   the interpreter to run.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

usage_unless 3 $# "CONFIG CHECKPOINT NPROC_PER_NODE [test.py options]"
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
torchrun_tool "$NPROC" test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
