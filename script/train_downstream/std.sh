#!/usr/bin/env bash
# Stage 2, the paper's standard fine-tuning (150 epochs, lr 0.001 x0.1 at 50 and 100, batch 64,
# wd 5e-4), on cifar10, cifar100 or svhn.
# usage: bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [flags]
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
usage_if_short 4 $# "bash script/train_downstream/std.sh DATASET INIT SAVE_DIR TICKET [flags]"
DATASET=$1 INIT=$2 SAVE_DIR=$3 TICKET=$4
shift 4
NGPU=${NGPU:-1} launch main_downstream.py --data "${DATA_DIR:-data}" --dataset "$DATASET" --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime st --epochs 150 --lr 0.001 \
  --milestones 50,100 --batch-size 64 --weight-decay 5e-4 --momentum 0.9 --eval-from 45 --image-size 224 \
  --save-dir "$SAVE_DIR" "$@"
