#!/usr/bin/env bash
# Stage 1, the paper's IMP with standard re-training on ImageNet (ResNet-50, 19 rounds of 20%,
# 30 epochs per round, SGD lr 5e-4, global batch 2048), on every local GPU through torchrun.
# usage: PRETRAIN=std|fat|at bash script/imp_pretrain/imp_std.sh INIT SAVE_DIR --data DATA_DIR [flags]
#   INIT      θ_p, in any format the importers read (docs/checkpoints.md)
#   SAVE_DIR  the run directory (tickets/round_XX.pt, sparsity.json); a rerun resumes there
#   --data    the ImageNet folder holding train/ and val/ (one subfolder per class); the older form,
#             DATA_DIR as the third argument, is still read
#   PRETRAIN  the label of INIT (or --pretrain LABEL among the flags); required
#   WORKERS   loader processes per GPU (default: 8, fewer if the CPUs per GPU are fewer)
#   NGPU, TORCHRUN_ARGS, MAX_RESTARTS: see script/_launch.sh --help
# Flags after SAVE_DIR are main_imp_pretrain.py's and override the values above
# (python main_imp_pretrain.py --help lists them with their defaults).
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
help_if_asked "$0" "$@"
usage_if_short 2 $# "bash script/imp_pretrain/imp_std.sh INIT SAVE_DIR --data DATA_DIR [flags]"
INIT=$1 SAVE_DIR=$2
shift 2
stage1_checks "$0" "$@"
[ $# -gt 0 ] && [ "${1#-}" = "$1" ] && set -- --data "$@"  # the older form: DATA_DIR as the third argument
launch main_imp_pretrain.py --dataset imagenet --arch resnet50 --init "$INIT" \
  ${PRETRAIN:+--pretrain "$PRETRAIN"} --method imp --retrain st --rate 0.2 --rounds 19 --epochs-per-round 30 \
  --lr 5e-4 --momentum 0.9 --weight-decay 1e-4 --batch-size 2048 --image-size 224 \
  --workers "${WORKERS:-$(workers_per_process 8)}" --save-dir "$SAVE_DIR" "$@"
