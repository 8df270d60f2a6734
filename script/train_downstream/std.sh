#!/usr/bin/env bash
# Stage 2, the paper's standard fine-tuning (150 epochs, lr 0.001 x0.1 at 50 and 100, batch 64,
# wd 5e-4), on cifar10, cifar100 or svhn.
# (selection from epoch 0.) These values are main_downstream.py's defaults for the regime and dataset (one source
# of truth, printed by `python main_downstream.py --help`); flags given after TICKET override them.
# usage: bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [flags]
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
usage_if_short 4 $# "bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [flags]"
DATASET=$1 INIT=$2 SAVE_DIR=$3 TICKET=$4
shift 4
if [ "$DATASET" != digits ]; then  # digits comes with scikit-learn: --data would have no effect (refused)
  set -- --data "${DATA_DIR:-data}" "$@"
fi
NGPU=${NGPU:-1} launch main_downstream.py --dataset "$DATASET" --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime st \
  --image-size 224 --save-dir "$SAVE_DIR" "$@"
