#!/usr/bin/env bash
# Download, here, the wheels that bench/gpu_check.sh needs on the lent GPU machine (Python 3.12,
# x86-64), into the git-ignored .whl/ folder that the device call carries. That machine has torch,
# torchvision, numpy, scipy, h5py, pillow, click and pytest, but not these.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  faiss-cpu==1.15.1 sqlalchemy greenlet typing-extensions tqdm flask werkzeug itsdangerous blinker \
  jinja2 markupsafe waitress threadpoolctl packaging
ls .whl
