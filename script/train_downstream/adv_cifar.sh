#!/usr/bin/env bash
# Stage 2, the paper's PGD-10 adversarial fine-tuning on CIFAR-10/100 (100 epochs, lr 0.1 x0.1 at
# 50 and 75, batch 128, wd 5e-4, eps 8/255, alpha 2/255, PGD-20 evaluation, selection from epoch 45).
# Those values are main_downstream.py's defaults for --regime at (one source of truth, printed by
# `python main_downstream.py --help`); flags given after TICKET override them.
# usage: bash script/train_downstream/adv_cifar.sh DATASET INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]
#   DATASET   cifar10 or cifar100
#   INIT      θ_p, in any format the importers read (docs/checkpoints.md)
#   SAVE_DIR  the run directory (results.json); a rerun resumes there or reports the finished run
#   TICKET    a ticket .pt from stage 1, or none for the dense baseline (then set PRETRAIN=std|fat|at)
#   --data    the folder holding cifar-10-batches-py / cifar-100-python; without it the environment
#             variable DATA_DIR, else ./data (the script says which it used)
#   NGPU      processes (default 1); see script/_launch.sh --help
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
help_if_asked "$0" "$@"
usage_if_short 4 $# "bash script/train_downstream/adv_cifar.sh DATASET INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]"
DATASET=$1 INIT=$2 SAVE_DIR=$3 TICKET=$4
shift 4
if [ "$DATASET" != digits ]; then  # digits comes with scikit-learn: --data would have no effect (refused)
  DATA=$(data_to_add "$@")
  if [ -n "$DATA" ]; then set -- --data "$DATA" "$@"; fi
fi
NGPU=${NGPU:-1} launch main_downstream.py --dataset "$DATASET" --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime at \
  --image-size 224 --save-dir "$SAVE_DIR" "$@"
