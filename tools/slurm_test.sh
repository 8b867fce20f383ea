#!/usr/bin/env bash
# Evaluation on a Slurm cluster: one task per GPU.
#
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options]
#
# Environment: GPUS (8, total), GPUS_PER_NODE (GPUS up to 8), CPUS_PER_TASK (5),
#   SRUN_ARGS (extra srun options), PORT (the rendezvous port, exported as MASTER_PORT;
#   29500 when unset), PYTHON (the repository's .venv/bin/python where it exists, else
#   python).
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

usage_unless 4 $# "PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]"
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
shift 4
slurm_tool "$PARTITION" "$JOB_NAME" test.py "$CONFIG" "$CHECKPOINT" --launcher slurm "$@"
