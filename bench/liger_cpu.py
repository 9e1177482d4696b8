"""Liger's real Triton kernels through the worker, on a CPU, under Triton's interpreter.

    pip install --target /tmp/liger triton liger-kernel     # once (triton ~190 MB; not in any extra)
    PYTHONPATH=/tmp/liger python bench/liger_cpu.py          # minutes: the interpreter runs kernels in numpy
    PYTHONPATH=/tmp/liger python bench/liger_cpu.py --one-process    # only the first check

No GPU is needed to check that the worker's use of Liger is right: Triton's interpreter
(TRITON_INTERPRET=1, set here) runs the same kernels on CPU tensors with numpy. Two checks, each
against the plain path in fp32:
  1. every family (llama with Llama 3.1 rope scaling, mistral, qwen2, qwen3) x full and LoRA, through
     model.build_structure and kernels.apply: Liger's RMSNorm, SwiGLU, RoPE (positions restarting, as
     in packed rows) and fused linear cross-entropy; the summed loss and every gradient;
  2. the worker's own strategy and train_step over two gloo ranks (fsdp full, fsdp LoRA, ds-zero2
     full): four optimizer steps' losses.
It says nothing about speed or bf16 numerics: those are bench/gpu.sh's. Two things Triton 3.6's
interpreter lacks are shimmed here (float scalar arguments; libdevice's rsqrt in Liger's RMSNorm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from llamajobs.spec import JobSpec  # noqa: E402
from llamajobs.worker import kernels  # noqa: E402
from llamajobs.worker import model as model_lib  # noqa: E402

LIGER = kernels.Kernels(liger=True, fused_loss=True, fp8=False)
PLAIN = kernels.Kernels(liger=False, fused_loss=False, fp8=False)
TOLERANCE = 1e-5  # relative, fp32


def shim_interpreter() -> None:
    """Eager Triton passes a Python float as an fp32 scalar; the interpreter passes the float itself,
    and Liger's kernels call .to() on it. Its scalars are one-element arrays, which numpy 2.5's int()
    refuses. libdevice's rsqrt has no interpreter implementation."""
    convert, patch_tensor = interpreter._implicit_cvt, interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    interpreter._patch_lang_tensor = patch_lang_tensor

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)
    interpreter._implicit_cvt = implicit_cvt
    from liger_kernel.ops import rms_norm

    rms_norm.rsqrt = lambda x: 1.0 / tl.sqrt(x)



def families() -> bool:
    from families import CONFIGS
    from transformers import AutoConfig

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    inputs, labels = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    labels[0, :7] = -100
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, -1)
    ok = True
    for family in CONFIGS:  # plain before Liger in each family: Liger patches the family's module for the process
        config = AutoConfig.for_model(family, **shape, **CONFIGS[family])
        results = {}
        for name, chosen in (("plain", PLAIN), ("liger", LIGER)):
            for mode in ("full", "lora"):
                torch.manual_seed(1)
                # Liger on the CPU: kernels.choose would pick it on CUDA only.
                model = model_lib.build_structure(JobSpec(mode=mode, lora_dropout=0.0), config, torch.float32, chosen)
                loss = model(input_ids=inputs, labels=labels, position_ids=positions).loss
                loss.backward()
                results[name, mode] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for mode in ("full", "lora"):
            (plain, plain_grads), (liger, liger_grads) = results["plain", mode], results["liger", mode]
            # (relative to each gradient's largest entry; a LoRA A's gradient is zero at B = 0)
            worst = max(((plain_grads[n] - liger_grads[n]).abs().max() / plain_grads[n].abs().max().clamp(min=1e-30))
                        .item() for n in plain_grads)
            good = abs(liger - plain) / plain < TOLERANCE and worst < TOLERANCE
            ok &= good
            print(f"{family:<8} {mode:<5} loss plain {plain:.6f} liger {liger:.6f}; {len(plain_grads)} gradients, "
                  f"largest relative difference {worst:.1e}: {'ok' if good else 'DIFFERENT'}", flush=True)
    return ok


def ranks(which: str, mode: str, strategy: str) -> None:
    """One rank of the two-rank run (under torchrun): four of the worker's train steps."""
    import worker_step as bench

    from llamajobs.worker import parallel, train

    torch.set_num_threads(1)
    spec = JobSpec(size="tiny", mode=mode, seq_len=64, micro_batch=2, global_batch=4, device="cpu",
                   strategy=strategy, lora_dropout=0.0, warmup_ratio=0.0, cluster="local", procs_per_node=2)
    env = parallel.init_distributed(spec)
    chosen = LIGER if which == "liger" else PLAIN
    built = train.build_strategy(spec, env)
    model = built.build_model(model_lib.model_config(spec), load_weights=False, chosen=chosen)
    torch.manual_seed(env.rank)
    bench.randomize(model)
    optimizer, scheduler = train.build_optimizer(model, spec, built, total=100)
    model, optimizer = built.wrap(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(4):
        batch = [bench.random_batch(spec, env.device, seed=10 * step + env.rank)]
        loss, _ = train.train_step(model, optimizer, scheduler, batch, strategy=built, params=params, max_norm=1.0,
                                   world_size=env.world_size)
        losses.append(float(loss))
    if env.rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    parallel.teardown()


def two_ranks() -> bool:
    ok = True
    for mode, strategy in (("full", "fsdp"), ("lora", "fsdp"), ("full", "ds-zero2")):
        curves = {}
        for which in ("plain", "liger"):
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                  __file__, "--ranks", which, mode, strategy], capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("LOSSES ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:])
                return False
            curves[which] = json.loads(line[0].split(" ", 1)[1])
        worst = max(abs(a - b) / a for a, b in zip(curves["plain"], curves["liger"]))
        good = worst < TOLERANCE
        ok &= good
        print(f"{strategy:<8} {mode:<5} 2 ranks, 4 steps: plain {curves['plain']}, liger {curves['liger']}; "
              f"largest relative difference {worst:.1e}: {'ok' if good else 'DIFFERENT'}", flush=True)
    return ok


if __name__ == "__main__":
    shim_interpreter()
    if sys.argv[1:2] == ["--ranks"]:
        ranks(*sys.argv[2:5])
    else:
        sys.exit(0 if families() & (sys.argv[1:2] == ["--one-process"] or two_ranks()) else 1)
