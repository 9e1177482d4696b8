#!/usr/bin/env bash
# The packages bench/gpu.sh needs that the device machine lacks (it has torch, transformers and peft,
# and no package registry), fetched here into .whl/ (git-ignored) for Python 3.12 on x86-64 Linux.
# DeepSpeed comes as its source archive: bench/gpu.sh installs it there, against that machine's torch.
# Pinned: liger-kernel 0.8.5 is the one bench/liger_cpu.py checked under Triton's interpreter; torchao
# 0.18 is built against torch 2.11 (that machine's); pydantic 2.14.4 wants pydantic-core 2.50.5 exactly
# and typing-extensions 4.16 or later (what that machine holds is not known: it travels too).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    liger-kernel==0.8.5 torchao==0.18.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
    typing-inspection typing-extensions submitit==1.5.4
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
du -sh .whl
