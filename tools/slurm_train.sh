#!/usr/bin/env bash
# Training on a Slurm cluster: one task per GPU, as many nodes as GPUS / GPUS_PER_NODE.
#
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]
#
# Environment: GPUS (8, total), GPUS_PER_NODE (GPUS up to 8), CPUS_PER_TASK (5),
#   SRUN_ARGS (extra srun options, e.g. "--quotatype=auto" or "--time=2-00:00:00"),
#   PORT (the rendezvous port, exported as MASTER_PORT; 29500 when unset),
#   PYTHON (the repository's .venv/bin/python where it exists, else python).
# Resume a killed or preempted job with the same command plus --resume.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

usage_unless 4 $# "PARTITION JOB_NAME CONFIG WORK_DIR [train.py options]"
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4
slurm_tool "$PARTITION" "$JOB_NAME" train.py "$CONFIG" --work-dir="$WORK_DIR" \
  --launcher slurm "$@"
