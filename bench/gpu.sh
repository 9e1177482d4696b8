#!/usr/bin/env bash
# Every GPU check of the project in one call of the device machine, most important first, each part
# under its own time limit so that one slow part never costs the others. From the repository root:
#   bench/gpu_wheels.sh                  (here, once: the missing packages into .whl/)
#   bash bench/gpu.sh                    (there, with .whl carried; everything goes to $OUT/gpu.txt)
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT" /tmp/site
LOG=$OUT/gpu.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2; shift 2
    echo -e "\n## $title (limit ${limit} s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "Warning" -e "warnings.warn" | tee -a "$LOG"
    echo "## $title: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}
{ nvidia-smi -L; python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
  transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$LOG"
part 100 "GPU tests (Liger against the plain path; FP8's linears; packing without a host sync)" \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_bench_packing.py
part 270 "the worker against the plain loop, plain modules, Liger and FP8" \
    python3 bench/worker_step.py --fill --json "$OUT/loops.json"
part 90 "packed documents kept apart, against unpacked and cross-attending packing" \
    python3 bench/packing.py --only 1.1b --repeats 2
part 100 "FP8 against bf16, 200 steps" python3 bench/worker_step.py --no-loops --only 1.1b --fp8-steps 200
part 150 "every strategy on this GPU, 1.1b full" \
    python3 bench/worker_step.py --no-loops --only 1.1b --strategies --warmup 2 --steps 3 --repeats 1
part 60 "the largest micro-batch, plain loss and fused" \
    python3 bench/worker_step.py --no-loops --only 1.1b --max-micro-batch 256
