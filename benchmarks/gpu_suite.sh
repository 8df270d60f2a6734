#!/usr/bin/env bash
# The benchmarks a lent GPU node runs, one JSON record each, in OUT (default: $OUT, else ./gpu_suite).
#
#   benchmarks/gpu_suite.sh [OUT] [PART ...]   parts: folder_tests loader_folder loader step (default: all, in order)
#
# folder_tests: tests/test_folder_uint8.py on the GPU, where its nvjpeg test decodes with nvJPEG.
# loader_folder: the image-folder paths (issue 31), pil vs uint8 vs nvjpeg on 224-px training crops of
#   synthetic 500x375 JPEGs, with half and all of the node's CPU cores as DataLoader workers;
#   target: uint8 >= 10,000 img/s into the GPU (folder_uint8_img_s).
# loader: the tensor loader against the PIL transforms, on CIFAR-sized arrays (benchmarks/README.md).
# step: the ResNet-50 PGD-10 and ST training steps at 89.26% sparsity, then the 100-epoch estimate.
# Every part stops at its own time limit (SUITE_PART_LIMIT seconds, default 240), so one slow part
# cannot use up a lent device's time; a part that fails or times out is reported and the rest run.
# PYTHON names the interpreter (default: python on PATH); SUITE_DEVICE the device (default cuda).
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_suite}}
shift $(( $# > 0 ? 1 : 0 ))
parts=${*:-folder_tests loader_folder loader step}
limit=${SUITE_PART_LIMIT:-240}
py=${PYTHON:-python}
device=${SUITE_DEVICE:-cuda}
for part in $parts; do
    case $part in
        folder_tests | loader_folder | loader | step) ;;
        *) echo "unknown part '$part'; choose from folder_tests loader_folder loader step" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
cores=$(nproc)
half=$(( cores / 2 > 0 ? cores / 2 : 1 ))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
status=0

run() {  # run NAME COMMAND...: the command's output in OUT/NAME.log, its failure reported
    local name=$1
    shift
    echo "== $name: $*"
    if ! timeout "$limit" "$@" > "$out/$name.log" 2>&1; then
        echo "!! $name failed or ran past ${limit}s; see $out/$name.log"
        status=1
    fi
    tail -n 8 "$out/$name.log"
}

for part in $parts; do
    case $part in
        folder_tests)
            run folder_tests "$py" -m pytest -q -p no:cacheprovider tests/test_folder_uint8.py ;;
        loader_folder)
            run loader_folder "$py" benchmarks/bench_loader.py --folder "${SUITE_JPEGS:-/tmp/suite_jpegs}" \
                --device "$device" --image-size 224 --batch-size 256 --batches 40 --workers "$half" "$cores" \
                --repeats 3 --json "$out/loader_folder.json" ;;
        loader)
            run loader "$py" benchmarks/bench_loader.py --device "$device" --image-size 224 --batch-size 128 \
                --workers "$cores" --json "$out/loader.json" ;;
        step)
            run step_at "$py" benchmarks/bench_step.py --arch resnet50 --image-size 224 --batch-size 128 \
                --sparsity 89.26 --regime at --device "$device" --iters 10 --repeats 5 --json "$out/step_at.json"
            run step_st "$py" benchmarks/bench_step.py --arch resnet50 --image-size 224 --batch-size 128 \
                --sparsity 89.26 --regime st --device "$device" --iters 20 --repeats 5 --skip-eval \
                --json "$out/step_st.json"
            if [ -f "$out/step_at.json" ] && [ -f "$out/loader.json" ]; then
                run estimate "$py" benchmarks/estimate_run.py "$out/step_at.json" --loader "$out/loader.json" \
                    --eval-from 45
            fi ;;
    esac
done
exit $status
