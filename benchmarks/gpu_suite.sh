#!/usr/bin/env bash
# Every GPU measurement of the project, one JSON record each, in OUT (default: $OUT, else ./gpu_suite).
#
#   benchmarks/gpu_suite.sh [OUT] [--device DEV] [--tiny] [PART ...]    (options and parts in any order)
#
# Parts, in the order they run (default: all):
# cuda_tests: the tests that skip without CUDA (those marked 'needs a CUDA GPU'); skipped off CUDA.
# folder_tests: tests/test_folder_uint8.py, whose nvjpeg test decodes with nvJPEG; skipped off CUDA.
# step: bench_step.py, ResNet-50 224 px batch 128 at 89.26% sparsity: PGD-10 AT eager with its
#   PGD-20 evaluation (step_at.json: eval_pgd20), and ST (step_st.json).
# step_compile: the PGD-10 AT step through torch.compile (step_at_compile.json).
# loader: the tensor loader against the PIL transforms on CIFAR-sized arrays (loader.json).
# loader_folder: the image-folder paths (issue 31), pil vs uint8 vs nvjpeg on synthetic 500x375 JPEGs,
#   with half and all of the node's CPU cores as DataLoader workers (loader_folder.json).
# downstream: a short real main_downstream.py PGD-10 AT run on GPU-resident CIFAR-10-format data (written
#   here in the cifar-10-batches-py format) without and with --compile, and downstream_check.json saying
#   whether the two agree (--tiny: the second run is eager too; inductor needs a minute per model on a CPU).
# precision: bench_eval_precision.py, bf16 vs fp32 RA on the same images, of the downstream run's model.
# inference: bench_inference.py, dense vs unstructured vs channel vs 2:4 tickets (inference.json).
# estimate: estimate_run.py, the 100-epoch CIFAR-10 AT run from step_at.json and loader.json.
#
# --tiny: sizes for a CPU test of the suite itself (resnet_tiny, 32 px, batch 8, 1 iteration; seconds).
# Every run stops at its own time limit (SUITE_PART_LIMIT seconds, default 240; killed 30 s later if it
# is still saving its state on SIGTERM), so one slow part
# cannot use up a lent device's time; a run that fails or times out is reported and the rest go on.
# The suite ends with a table of every run (status, seconds, record), also in OUT/suite.json, and
# exits 1 if any run failed. benchmarks/gpu_table.py OUT turns the records into benchmarks/README.md rows.
# PYTHON names the interpreter (default: python on PATH); SUITE_DEVICE the default device (cuda).
set -u
cd "$(dirname "$0")/.."
all_parts="cuda_tests folder_tests step step_compile loader loader_folder downstream precision inference estimate"
out=${OUT:-gpu_suite}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    out=$1
    shift
fi
device=${SUITE_DEVICE:-cuda}
tiny=0
parts=""
while [ $# -gt 0 ]; do
    case $1 in
        --device)
            [ $# -ge 2 ] || { echo "--device needs a value, e.g. --device cpu" >&2; exit 2; }
            device=$2
            shift ;;
        --tiny) tiny=1 ;;
        -*) echo "unknown option '$1'; the options are --device DEV and --tiny" >&2; exit 2 ;;
        *)
            case " $all_parts " in
                *" $1 "*) parts="$parts $1" ;;
                *) echo "unknown part '$1'; choose from $all_parts" >&2; exit 2 ;;
            esac ;;
    esac
    shift
done
parts=${parts:-$all_parts}
limit=${SUITE_PART_LIMIT:-240}
py=${PYTHON:-python}
on_cuda=0
case $device in cuda*) on_cuda=1 ;; esac
mkdir -p "$out"
cores=$(nproc)
half=$(( cores / 2 > 0 ? cores / 2 : 1 ))
if [ $on_cuda = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
fi

# Sizes: the issue's (ResNet-50, 224 px, batch 128) or the tiny CPU ones.
if [ $tiny = 1 ]; then
    net=(--arch resnet_tiny --cifar-stem --image-size 32)
    step=("${net[@]}" --batch-size 8 --warmup 1 --repeats 1 --attack-steps 2 --eval-steps 2 --eval-batches 1)
    at_iters=1; st_iters=1
    loader=(--image-size 32 --batch-size 8 --num-images 64 --batches 2 --repeats 1 --workers 0)
    folder=(--image-size 32 --batch-size 8 --batches 2 --repeats 1 --workers 0 1)
    cifar=(16 16)   # images per training batch file, test images
    train=(--arch resnet_tiny --cifar-stem --batch-size 8 --train-steps 2 --test-steps 2)
    precision=(--arch resnet_tiny --cifar-stem --num-images 16 --batch-size 8 --steps 2)
    inference=("${net[@]}" --num-classes 10 --batch-size 8 --channel-sparsities 50 --unstructured-sparsities 90
               --latency-iters 1 --throughput-iters 1 --warmup 1 --repeats 1)
else
    net=(--arch resnet50 --image-size 224)
    step=("${net[@]}" --batch-size 128 --repeats 5)
    at_iters=10; st_iters=20
    loader=(--image-size 224 --batch-size 128 --workers "$cores")
    folder=(--image-size 224 --batch-size 256 --batches 40 --workers "$half" "$cores" --repeats 3)
    cifar=(1000 1000)
    train=(--arch resnet18 --cifar-stem --batch-size 128)
    precision=(--arch resnet18 --cifar-stem --num-images 1000 --batch-size 250)
    inference=("${net[@]}" --batch-size 256 --repeats 5)
fi

names=(); states=(); seconds=(); records=()
failed=0
downstream_ran=0

note() {  # note NAME STATUS SECONDS RECORD: one row of the summary
    names+=("$1"); states+=("$2"); seconds+=("$3"); records+=("$4")
}

run() {  # run NAME RECORD COMMAND...: the output in OUT/NAME.log; ok when it exits 0 and RECORD exists
    local name=$1 record=$2 start rc state
    shift 2
    echo "== $name: $*"
    start=$(date +%s)
    # a shell function below puts its own commands under the limit (timeout runs programs only)
    if [ "$(type -t "$1")" = function ]; then "$@"; else timeout -k 30 "$limit" "$@"; fi > "$out/$name.log" 2>&1
    rc=$?
    state=ok
    if [ $rc = 124 ]; then
        state=timeout
    elif [ $rc != 0 ] || [ ! -f "$out/$record" ]; then
        state=failed
    fi
    if [ $state != ok ]; then
        echo "!! $name $state (exit $rc, limit ${limit}s); see $out/$name.log"
        failed=1
    fi
    tail -n 8 "$out/$name.log"
    note "$name" "$state" "$(( $(date +%s) - start ))" "$record"
}

skip() {  # skip NAME WHY
    echo "== $1: skipped ($2)"
    note "$1" skipped 0 -
}

cuda_tests() {  # pytest's verdicts as JSON: passed, failed, skipped (a skip here means a CUDA path is missing)
    local files
    files=$(grep -l "needs a CUDA GPU" tests/*.py)
    # shellcheck disable=SC2086
    timeout -k 30 "$limit" "$py" -m pytest -q -p no:cacheprovider $files -k "cuda or gpu" --junitxml="$out/cuda_tests.xml"
    local rc=$?
    [ $rc = 124 ] && return 124
    "$py" - "$out/cuda_tests.xml" "$out/cuda_tests.json" "$device" <<'EOF' || return 1
import json, sys, xml.etree.ElementTree as ET
import torch
from benchmarks import _common
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
count = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
record = {**_common.stamp(torch.device(sys.argv[3])), "selected": count["tests"], "failed": count["failures"] + count["errors"],
          "skipped": count["skipped"], "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"]}
json.dump(record, open(sys.argv[2], "w"), indent=1)
EOF
    return $rc
}

write_cifar() {  # CIFAR-10 in its on-disk format (random images), once per OUT
    [ -d "$out/cifar/cifar-10-batches-py" ] && return 0
    timeout -k 30 "$limit" "$py" -c "import sys; from pathlib import Path; from tests.fixtures import write_cifar10
write_cifar10(Path(sys.argv[1]), per_batch=int(sys.argv[2]), n_test=int(sys.argv[3]))" "$out/cifar" "${cifar[@]}"
}

downstream() {  # downstream NAME [--compile]: a one-epoch PGD-10 AT run from a random init
    rm -rf "${out:?}/$1"
    # random images and labels: chance level by design, hence --allow-chance
    timeout -k 30 "$limit" "$py" main_downstream.py --data "$out/cifar" --dataset cifar10 --init none --pretrain at --regime at \
        --epochs 1 --image-size 32 --device "$device" --no-progress --allow-chance --save-dir "$out/$1" \
        "${train[@]}" "${@:2}"
}

check_downstream() {  # the two runs' results and training loss agree, within the tolerance below
    timeout -k 30 "$limit" "$py" - "$out" "$device" <<'EOF'
"""Eager vs compiled stage-2 run: the same seed, data and steps, so they differ only by inductor's
fused and reordered kernels (test_precision.py allows rtol 1e-3 per step on a GPU) and by bf16
rounding, which compound over the run's steps. On random labels the model sits at chance, where
logits are nearly tied and a tiny difference flips an image's prediction: SA and RA may therefore
move by a few images (at most 2 points here, i.e. 20 of 1,000 test images), while the mean training
loss, a smooth quantity, must stay within 2% (bf16 alone rounds each op at about 0.4%)."""
import csv, json, sys
import torch
from pathlib import Path
from benchmarks import _common
out = Path(sys.argv[1])
res = {n: json.loads((out / n / "results.json").read_text()) for n in ("downstream_eager", "downstream_compile")}
loss = {n: float(list(csv.DictReader(open(out / n / "log.csv")))[-1]["train_loss"]) for n in res}
e, c = res["downstream_eager"], res["downstream_compile"]
le, lc = loss["downstream_eager"], loss["downstream_compile"]
diffs = {"sa": abs(e["sa"] - c["sa"]), "ra": abs(e["ra"] - c["ra"]), "train_loss_rel": abs(le - lc) / abs(le)}
tol = {"sa": 2.0, "ra": 2.0, "train_loss_rel": 0.02}
record = {**_common.stamp(torch.device(sys.argv[2])), "eager": {"sa": e["sa"], "ra": e["ra"], "train_loss": le},
          "compile": {"sa": c["sa"], "ra": c["ra"], "train_loss": lc}, "diff": diffs, "tolerance": tol,
          "second_run_compiled": json.loads((out / "downstream_compile" / "config.json").read_text()).get("compile"),
          "agree": all(diffs[k] <= tol[k] for k in tol)}
(out / "downstream_check.json").write_text(json.dumps(record, indent=1))
print(json.dumps(record))
sys.exit(0 if record["agree"] else 1)
EOF
}

for part in $parts; do
    case $part in
        cuda_tests)
            if [ $on_cuda = 1 ]; then run cuda_tests cuda_tests.json cuda_tests
            else skip cuda_tests "CUDA-only tests; the device is $device"; fi ;;
        folder_tests)
            if [ $on_cuda = 1 ]; then
                run folder_tests folder_tests.xml "$py" -m pytest -q -p no:cacheprovider tests/test_folder_uint8.py \
                    --junitxml="$out/folder_tests.xml"
            else skip folder_tests "its nvjpeg test needs CUDA; the device is $device"; fi ;;
        step)
            run step_at step_at.json "$py" benchmarks/bench_step.py "${step[@]}" --sparsity 89.26 --regime at \
                --device "$device" --iters $at_iters --json "$out/step_at.json"
            run step_st step_st.json "$py" benchmarks/bench_step.py "${step[@]}" --sparsity 89.26 --regime st \
                --device "$device" --iters $st_iters --skip-eval --json "$out/step_st.json" ;;
        step_compile)
            if [ $tiny = 1 ]; then skip step_at_compile "--tiny: inductor needs a minute per model on a CPU"
            else
                run step_at_compile step_at_compile.json "$py" benchmarks/bench_step.py "${step[@]}" --sparsity 89.26 \
                    --regime at --device "$device" --compile --iters $at_iters --skip-eval \
                    --json "$out/step_at_compile.json"
            fi ;;
        loader)
            run loader loader.json "$py" benchmarks/bench_loader.py --device "$device" "${loader[@]}" \
                --json "$out/loader.json" ;;
        loader_folder)
            run loader_folder loader_folder.json "$py" benchmarks/bench_loader.py \
                --folder "${SUITE_JPEGS:-$out/jpegs}" --device "$device" "${folder[@]}" --json "$out/loader_folder.json" ;;
        downstream)
            run cifar_data cifar/cifar-10-batches-py/test_batch write_cifar
            run downstream_eager downstream_eager/results.json downstream downstream_eager
            if [ $tiny = 1 ]; then
                echo "   (--tiny: the second run is eager too; inductor needs a minute per model on a CPU)"
                run downstream_compile downstream_compile/results.json downstream downstream_compile
            else
                run downstream_compile downstream_compile/results.json downstream downstream_compile --compile
            fi
            run downstream_check downstream_check.json check_downstream
            downstream_ran=1 ;;
        precision)
            # a model of this suite's downstream part; made here when that part was not asked for
            [ -f "$out/downstream_eager/model_best.pt" ] || [ $downstream_ran = 1 ] || {
                run cifar_data cifar/cifar-10-batches-py/test_batch write_cifar
                run downstream_eager downstream_eager/results.json downstream downstream_eager
            }
            run precision precision.json "$py" benchmarks/bench_eval_precision.py --dataset cifar10 --data "$out/cifar" \
                --init "$out/downstream_eager/model_best.pt" --image-size 32 --device "$device" "${precision[@]}" \
                --json "$out/precision.json" ;;
        inference)
            run inference inference.json "$py" benchmarks/bench_inference.py --device "$device" "${inference[@]}" \
                --json "$out/inference.json" ;;
        estimate)
            if [ -f "$out/step_at.json" ] && [ -f "$out/loader.json" ]; then
                run estimate estimate.json "$py" benchmarks/estimate_run.py "$out/step_at.json" \
                    --loader "$out/loader.json" --eval-from 45 --json "$out/estimate.json"
            else
                echo "!! estimate: needs step_at.json and loader.json in $out (parts step and loader)"
                note estimate failed 0 estimate.json
                failed=1
            fi ;;
    esac
done

echo
printf '%-20s %-8s %8s  %s\n' run status seconds record
{
    echo "["
    for i in "${!names[@]}"; do
        printf '%-20s %-8s %8s  %s\n' "${names[$i]}" "${states[$i]}" "${seconds[$i]}" "${records[$i]}" >&3
        sep=","; [ "$i" = $(( ${#names[@]} - 1 )) ] && sep=""
        printf '  {"run": "%s", "status": "%s", "seconds": %s, "record": "%s"}%s\n' \
            "${names[$i]}" "${states[$i]}" "${seconds[$i]}" "${records[$i]}" "$sep"
    done
    echo "]"
} 3>&1 > "$out/suite.json"
exit $failed
