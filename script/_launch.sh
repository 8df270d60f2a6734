# Sourced by the entry scripts: run a Python entry point on every local GPU.
#   NGPU=N            processes on this node (default: all visible GPUs; 1 process without GPUs)
#   TORCHRUN_ARGS=... extra torchrun flags, e.g. for several nodes:
#                     "--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1"
#   MAX_RESTARTS=N    torchrun restarts the group after a crash; the run resumes from its checkpoint
#   SHUTDOWN_TIMEOUT=S seconds torchrun waits for ranks to checkpoint after SIGTERM (default 240)
# Exit status 75: the run stopped on SIGTERM/SIGUSR1 with its state saved (requeue / rerun to resume).
#   PYTHON=...        the interpreter (default: python)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

local_gpus() {  # the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), as PyTorch counts them
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

save_dir_of() {  # the value of the last --save-dir / --save_dir among the arguments
  local dir="" prev=""
  for a in "$@"; do
    case "$prev" in --save-dir|--save_dir) dir=$a ;; esac
    case "$a" in --save-dir=*|--save_dir=*) dir=${a#*=} ;; esac
    prev=$a
  done
  printf '%s' "$dir"
}

launch() {
  local entry=$1; shift
  local n=${NGPU:-$(local_gpus)}
  if [ -z "${TORCHRUN_ARGS:-}" ] && [ "${n:-0}" -le 1 ]; then
    exec "$PYTHON" "$REPO_ROOT/$entry" "$@"  # one process: its own exit status (75 = stopped, resumable)
  fi
  [ "${n:-0}" -ge 1 ] || n=1  # several CPU-only nodes: one process each
  local rdzv="--standalone"
  [ -n "${TORCHRUN_ARGS:-}" ] && rdzv=""
  # torchrun gives its workers 30 s after forwarding SIGTERM before it kills them; a checkpoint of
  # ImageNet re-training after the ranks agree on a step can take longer (where the flag exists)
  local grace=""
  if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--shutdown-timeout"; then
    grace="--shutdown-timeout ${SHUTDOWN_TIMEOUT:-240}"
  fi
  local save_dir
  save_dir=$(save_dir_of "$@")
  # shellcheck disable=SC2086
  "$PYTHON" -m torch.distributed.run $rdzv --nproc-per-node "${n}" --max-restarts "${MAX_RESTARTS:-0}" $grace \
    ${TORCHRUN_ARGS:-} "$REPO_ROOT/$entry" "$@" &
  local pid=$! rc=0
  # pass a stop on to torchrun, which forwards it to every rank
  trap 'kill -TERM "$pid" 2>/dev/null' TERM USR1 INT
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # the wait was cut short by a trapped signal
    rc=0
    wait "$pid" || rc=$?
  done
  trap - TERM USR1 INT
  # torchrun reports any failed worker as 1; the marker rank 0 leaves tells a requeueable stop from a crash
  if [ "$rc" -ne 0 ] && [ -n "$save_dir" ] && [ -f "$save_dir/.preempted" ]; then
    exit 75
  fi
  exit "$rc"
}

usage_if_short() {  # usage_if_short NEEDED GIVEN "usage text"
  if [ "$2" -lt "$1" ]; then
    echo "usage: $3" >&2
    exit 2
  fi
}
