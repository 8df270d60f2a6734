# Sourced by the entry scripts: run a Python entry point on every local GPU.
#   NGPU=N            processes on this node (default: all visible GPUs; 1 process without GPUs)
#   TORCHRUN_ARGS=... extra torchrun flags, e.g. for several nodes:
#                     "--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1"
#   MAX_RESTARTS=N    torchrun restarts the group after a crash; the run resumes from its checkpoint
#   PYTHON=...        the interpreter (default: python)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

local_gpus() {  # the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), as PyTorch counts them
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

launch() {
  local entry=$1; shift
  local n=${NGPU:-$(local_gpus)}
  if [ -z "${TORCHRUN_ARGS:-}" ] && [ "${n:-0}" -le 1 ]; then
    exec "$PYTHON" "$REPO_ROOT/$entry" "$@"
  fi
  [ "${n:-0}" -ge 1 ] || n=1  # several CPU-only nodes: one process each
  local rdzv="--standalone"
  [ -n "${TORCHRUN_ARGS:-}" ] && rdzv=""
  # shellcheck disable=SC2086
  exec "$PYTHON" -m torch.distributed.run $rdzv --nproc-per-node "${n}" --max-restarts "${MAX_RESTARTS:-0}" \
    ${TORCHRUN_ARGS:-} "$REPO_ROOT/$entry" "$@"
}

usage_if_short() {  # usage_if_short NEEDED GIVEN "usage text"
  if [ "$2" -lt "$1" ]; then
    echo "usage: $3" >&2
    exit 2
  fi
}
