#!/usr/bin/env bash
# The GPU checks of one device session, in one call (~8 minutes): the GPU tests, then training,
# encoding and search throughput, each against its baseline in the same run. Prints short tables.
#   here:   bash bench/fetch_gpu_wheels.sh            (once; fills the git-ignored .whl/)
#   device: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== GPU tests (the CUDA-parametrised cases run only where CUDA is present)"
timeout 150 python3 -m pytest -q -x tests/test_search.py tests/test_model.py tests/test_gpu.py 2>&1 | tail -5

echo "== training: fp32 eager reference vs our step (batch 64, then 256; then bf16 + channels-last)"
for b in 64 256; do
  timeout 90 python3 bench/train_throughput.py --device cuda --presets sprites,celeba-dcgan --batch-size $b --repeats 10
  timeout 90 python3 bench/train_throughput.py --device cuda --presets sprites,celeba-dcgan --batch-size $b --repeats 10 --bf16 --channels-last
done 2>&1 | tee "$OUT/train.txt"

echo "== encoding: 200K synthetic 178x218 JPEGs -> index"
timeout 200 python3 bench/encode_bench.py --n 200000 --device cuda --workers 14 --bf16 2>&1 | tail -9 | tee "$OUT/encode.txt"

echo "== search on the GPU: 1M x 8 x 64"
timeout 120 python3 bench/gpu_search_bench.py --device cuda --n 1000000 2>&1 | tee "$OUT/search.txt"
