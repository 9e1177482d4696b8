#!/usr/bin/env bash
# The packages bench/gpu.sh needs that the device machine lacks (it has torch, transformers and peft,
# and no package registry), fetched here into .whl/ (git-ignored) for Python 3.12 on x86-64 Linux.
# DeepSpeed comes as its source archive: bench/gpu.sh installs it there, against that machine's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    liger-kernel torchao hjson pydantic pydantic-core annotated-types typing-inspection submitit
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
du -sh .whl
