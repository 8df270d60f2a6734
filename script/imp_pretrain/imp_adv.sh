#!/usr/bin/env bash
# Stage 1, the paper's IMP with PGD-3 adversarial re-training on ImageNet (eps 8/255, alpha 2/255),
# otherwise as imp_std.sh, on every local GPU through torchrun.
# usage: bash script/imp_pretrain/imp_adv.sh INIT SAVE_DIR DATA_DIR [extra flags]
set -euo pipefail
source "$(dirname "$0")/../_launch.sh"
usage_if_short 3 $# "bash script/imp_pretrain/imp_adv.sh INIT SAVE_DIR DATA_DIR [flags]"
INIT=$1 SAVE_DIR=$2 DATA_DIR=$3
shift 3
case " $* " in *" --pretrain "*|*" --pretrain="*) PRETRAIN_FLAG=1 ;; *) PRETRAIN_FLAG= ;; esac
if [ -z "${PRETRAIN:-}" ] && [ -z "$PRETRAIN_FLAG" ]; then
  echo "error: set PRETRAIN to the label of INIT (std, fat or at), e.g. PRETRAIN=at bash $0 ...; tickets are paired with the dense baseline of the same label, so a wrong default would compare them with the wrong one." >&2
  exit 2
fi
launch main_imp_pretrain.py --data "$DATA_DIR" --dataset imagenet --arch resnet50 --init "$INIT" \
  ${PRETRAIN:+--pretrain "$PRETRAIN"} --method imp --retrain at --attack-steps 3 --eps 8/255 --alpha 2/255 \
  --rate 0.2 --rounds 19 --epochs-per-round 30 --lr 5e-4 --momentum 0.9 --weight-decay 1e-4 \
  --batch-size 2048 --image-size 224 --workers "${WORKERS:-8}" --save-dir "$SAVE_DIR" "$@"
