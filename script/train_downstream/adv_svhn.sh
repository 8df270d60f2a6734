#!/usr/bin/env bash
# Stage 2, the paper's PGD-10 adversarial fine-tuning on SVHN (80 epochs, lr 0.01 cosine, batch 128,
# wd 5e-4, eps 8/255, alpha 2/255, PGD-20 evaluation).
# (selection from epoch 0.) These values are main_downstream.py's defaults for the regime and dataset (one source
# of truth, printed by `python main_downstream.py --help`); flags given after TICKET override them.
# usage: bash script/train_downstream/adv_svhn.sh INIT SAVE_DIR TICKET [flags]
#   DATA_DIR (env, default ./data) holds train_32x32.mat and test_32x32.mat.
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
usage_if_short 3 $# "bash script/train_downstream/adv_svhn.sh INIT SAVE_DIR TICKET [flags]"
INIT=$1 SAVE_DIR=$2 TICKET=$3
shift 3
NGPU=${NGPU:-1} launch main_downstream.py --data "${DATA_DIR:-data}" --dataset svhn --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime at \
  --image-size 224 --save-dir "$SAVE_DIR" "$@"
