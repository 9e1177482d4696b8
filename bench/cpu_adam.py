"""CPU AdamW per parameter: torch's for-loop, foreach and fused paths against DeepSpeedCPUAdam.

What fsdp-offload's optimizer step costs on the node: the estimator's cpu_adam_* assumptions come
from here. Times one step over fp32 parameters (a few tensors the size of a LLaMA layer's matrices),
after a warm-up step, on 1 thread and on every core this process may use.

    python bench/cpu_adam.py [--params 20e6] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def make(n: int, tensors: int = 8) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(n // tensors)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def time_step(build, n: int, steps: int) -> float:
    params = make(n)
    opt = build(params)
    opt.step()  # warm-up: the states are allocated here
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def candidates() -> dict:
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    out = {
        "torch AdamW for-loop": lambda p: torch.optim.AdamW(p, foreach=False, **kw),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(p, foreach=True, **kw),
        "torch AdamW fused": lambda p: torch.optim.AdamW(p, fused=True, **kw),
    }
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        out["DeepSpeedCPUAdam"] = lambda p: DeepSpeedCPUAdam(p, adamw_mode=True, **kw)
    except Exception as e:  # noqa: BLE001 - a build failure is a result too
        print(f"DeepSpeedCPUAdam unavailable: {e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    n, cores = int(args.params), len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {n:,} fp32 parameters, {cores} core(s) available")
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        for name, build in candidates().items():
            seconds = time_step(build, n, args.steps)
            print(f"{threads} thread(s)  {name:22s} {seconds * 1e3:8.1f} ms/step  "
                  f"{n / seconds / 1e6:7.1f} M params/s  {n / seconds / threads / 1e6:7.1f} M/s per core")


if __name__ == "__main__":
    main()
