# Sourced by the entry scripts (not run by itself): run a Python entry point on every local GPU.
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

help_if_asked() {  # help_if_asked SCRIPT ARGS...: -h or --help first prints SCRIPT's header comment and exits 0
  case "${2:-}" in
    -h|--help) sed -n '1,/^[^#]/{/^#!/d;s/^# \{0,1\}//p;}' "$1"; exit 0 ;;
  esac
}

flag_value() {  # flag_value NAME ARGS...: the value of the last NAME among ARGS (NAME VALUE or NAME=VALUE)
  local name=$1 value="" prev=""
  shift
  for a in "$@"; do
    [ "$prev" = "$name" ] && value=$a
    case "$a" in "$name"=*) value=${a#*=} ;; esac
    prev=$a
  done
  printf '%s' "$value"
}

data_to_add() {  # data_to_add ARGS...: the stage-2 data folder to add as --data (empty: ARGS hold --data)
  local given
  given=$(flag_value --data "$@")
  if [ -n "$given" ]; then
    echo "data: $given (from --data)" >&2
  elif [ -n "${DATA_DIR:-}" ]; then
    echo "data: $DATA_DIR (from the environment variable DATA_DIR; --data DIR is the flag)" >&2
    printf '%s' "$DATA_DIR"
  else
    echo "data: ./data (the default; pass --data DIR)" >&2
    printf 'data'
  fi
}

workers_per_process() {  # workers_per_process MAX: loader workers per GPU process, fewer if the CPUs are fewer
  local n=${NGPU:-$(local_gpus)} cpus
  [ "${n:-0}" -ge 1 ] || n=1
  cpus=$(nproc 2>/dev/null || echo "$1")  # nproc counts the CPUs this process may use (its affinity)
  if [ $((cpus / n)) -lt "$1" ]; then echo $((cpus / n)); else echo "$1"; fi
}

stage1_checks() {  # stage1_checks SCRIPT ARGS...: a stage-1 script needs a PRETRAIN label and a data folder
  local data
  case " ${*:2} " in *" --pretrain "*|*" --pretrain="*) ;; *)
    if [ -z "${PRETRAIN:-}" ]; then
      echo "error: set PRETRAIN to the label of INIT (std, fat or at), e.g. PRETRAIN=at bash $1 ...; tickets are paired with the dense baseline of the same label, so a wrong default would compare them with the wrong one." >&2
      exit 2
    fi ;;
  esac
  data=$(flag_value --data "${@:2}")
  if [ -z "$data" ] && { [ $# -lt 2 ] || [ "${2#-}" != "$2" ]; }; then
    echo "error: no data folder; pass the ImageNet folder (train/ and val/) with --data DIR, e.g. bash $1 INIT SAVE_DIR --data /datasets/imagenet." >&2
    exit 2
  fi
  if [ -n "$data" ]; then echo "data: $data (from --data)" >&2; else echo "data: $2 (the third argument)" >&2; fi
}

usage_if_short() {  # usage_if_short NEEDED GIVEN "usage text"
  if [ "$2" -lt "$1" ]; then
    echo "usage: $3" >&2
    exit 2
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run rather than sourced: it only defines functions
  help_if_asked "$0" --help
fi
