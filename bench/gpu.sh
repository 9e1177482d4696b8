#!/usr/bin/env bash
# Every GPU check of the project in one call of the device machine, most important first, each part
# under its own time limit so that one slow part never costs the others; the limits add up to 540 s,
# so the whole fits one call (600 s at most; a session has 15 minutes of device time, start included).
# From the repository root:
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
# DeepSpeed's CPU Adam (the offload strategies) compiles once, here on the CPUs while the GPU works.
timeout 400 python3 -c "import time; t = time.time(); from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()
print(f'DeepSpeed CPU Adam compiled and loaded in {time.time() - t:.0f} s')" > /tmp/cpu_adam.txt 2>&1 &
part 45 "GPU tests (Liger against the plain path; FP8's linears; packing without a host sync)" \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_bench_packing.py
part 210 "the worker against the compiled plain loop: plain modules, Liger, FP8" \
    python3 bench/worker_step.py --compiled-only --fill --repeats 2 --json "$OUT/loops.json"
part 80 "FP8 against bf16, 200 steps" python3 bench/worker_step.py --no-loops --only 1.1b --fp8-steps 200
part 115 "every strategy on this GPU, 1.1b full" \
    python3 bench/worker_step.py --no-loops --only 1.1b --strategies --warmup 2 --steps 3 --repeats 1
part 45 "the largest micro-batch, plain loss and fused" \
    python3 bench/worker_step.py --no-loops --only 1.1b --max-micro-batch 256
part 45 "packed documents kept apart, against unpacked and cross-attending packing" \
    python3 bench/packing.py --only 1.1b --repeats 2
wait
{ echo -e "\n## DeepSpeed's CPU Adam (compiled in the background from the start)"; tail -5 /tmp/cpu_adam.txt; } | tee -a "$LOG"
