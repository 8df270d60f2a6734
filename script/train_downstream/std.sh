#!/usr/bin/env bash
# Stage 2, the paper's standard fine-tuning (150 epochs, lr 0.001 x0.1 at 50 and 100, batch 64,
# wd 5e-4, selection from epoch 0), on cifar10, cifar100 or svhn.
# These values are main_downstream.py's defaults for the regime and dataset (one source of truth,
# printed by `python main_downstream.py --help`); flags given after TICKET override them.
# usage: bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]
#   DATASET   cifar10, cifar100 or svhn (or digits, which needs no --data)
#   INIT      θ_p, in any format the importers read (docs/checkpoints.md)
#   SAVE_DIR  the run directory (results.json); a rerun resumes there or reports the finished run
#   TICKET    a ticket .pt from stage 1, or none for the dense baseline (then set PRETRAIN=std|fat|at)
#   --data    the folder holding the dataset's files; without it the environment variable DATA_DIR,
#             else ./data (the script says which it used)
#   NGPU      processes (default 1); see script/_launch.sh --help
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
help_if_asked "$0" "$@"
usage_if_short 4 $# "bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]"
DATASET=$1 INIT=$2 SAVE_DIR=$3 TICKET=$4
shift 4
if [ "$DATASET" != digits ]; then  # digits comes with scikit-learn: --data would have no effect (refused)
  DATA=$(data_to_add "$@")
  if [ -n "$DATA" ]; then set -- --data "$DATA" "$@"; fi
fi
NGPU=${NGPU:-1} launch main_downstream.py --dataset "$DATASET" --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime st \
  --image-size 224 --save-dir "$SAVE_DIR" "$@"
