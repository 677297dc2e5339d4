#!/usr/bin/env bash
# The prepared GPU check, one command (7.5 minutes at most on one H100/H200; nothing downloaded):
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# 1. the speed benchmark on CUDA at the paper's resolution (1 x 224 x 288, bf16 autocast): the float32
#    correctness gates, fast / naive at N = 2, 4, 8, the default adversaries against the paper's at N = 8,
#    CUDA memory and seconds per iteration of the default settings at N = 2, 4, 8, main-step options.
#
# Needs torch with CUDA, timm, einops, rich, pytest and hypothesis; pydantic and safetensors come from wheels in
# .whl/ when the machine lacks them (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection). mtdisent is installed
# into a scratch directory (its entry points register the first-party plugins), never into the system.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
site=/tmp/mtdisent-site
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_machine.txt"
# debugging switches an image may set make every kernel launch or allocation synchronous: recorded, then off
env | grep -E '^(CUDA_LAUNCH_BLOCKING|PYTORCH_NO_CUDA_MEMORY_CACHING|PYTORCH_CUDA_ALLOC_CONF)=' \
    | tee -a "$out/gpu_machine.txt" || true
unset CUDA_LAUNCH_BLOCKING PYTORCH_NO_CUDA_MEMORY_CACHING
# most wanted first (results are written after every section): the gates last, they took most of 450 s at
# 224 x 288 on an H200 (2026-12-04) and passed there at N = 2 and 4
timeout 450 python3 benchmarks/speed.py --gpu --threads 16 --only profile ratio memory default main gates --out "$out" \
    2>&1 | tee "$out/speed_gpu.log"
