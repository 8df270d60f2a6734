#!/usr/bin/env bash
# Stage 2, the paper's PGD-10 adversarial fine-tuning on SVHN (80 epochs, lr 0.01 cosine, batch 128,
# wd 5e-4, eps 8/255, alpha 2/255, PGD-20 evaluation, selection from epoch 0).
# These values are main_downstream.py's defaults for the regime and dataset (one source of truth,
# printed by `python main_downstream.py --help`); flags given after TICKET override them.
# usage: bash script/train_downstream/adv_svhn.sh INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]
#   INIT      θ_p, in any format the importers read (docs/checkpoints.md)
#   SAVE_DIR  the run directory (results.json); a rerun resumes there or reports the finished run
#   TICKET    a ticket .pt from stage 1, or none for the dense baseline (then set PRETRAIN=std|fat|at)
#   --data    the folder holding train_32x32.mat and test_32x32.mat; without it the environment
#             variable DATA_DIR, else ./data (the script says which it used)
#   NGPU      processes (default 1); see script/_launch.sh --help
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
help_if_asked "$0" "$@"
usage_if_short 3 $# "bash script/train_downstream/adv_svhn.sh INIT SAVE_DIR TICKET [--data DATA_DIR] [flags]"
INIT=$1 SAVE_DIR=$2 TICKET=$3
shift 3
DATA=$(data_to_add "$@")
if [ -n "$DATA" ]; then set -- --data "$DATA" "$@"; fi
NGPU=${NGPU:-1} launch main_downstream.py --dataset svhn --arch resnet50 \
  --init "$INIT" ${PRETRAIN:+--pretrain "$PRETRAIN"} --ticket "$TICKET" --regime at \
  --image-size 224 --save-dir "$SAVE_DIR" "$@"
