"""Distributed setup and data parallelism: the process group, FSDP2 sharding, gradient clipping.

Strategies here: fsdp (FSDP2 full shard per decoder layer, bf16 compute on GPU) and fsdp-offload
(the same with parameters, gradients and optimizer state on the CPU). DeepSpeed and pp come later.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from llamajobs.spec import JobSpec

SUPPORTED_STRATEGIES = ("fsdp", "fsdp-offload")
# Collectives wait this long before the watchdog aborts the job. Longer than torch's 10 minutes
# because every rank waits in one while rank 0 alone reads a checkpoint (65B: 130 GB) or writes final/.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True, slots=True)
class Dist:
    """Where this process sits: torchrun's environment, resolved once."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device


def check_strategy(spec: JobSpec) -> None:
    if spec.strategy not in SUPPORTED_STRATEGIES:
        raise NotImplementedError(
            f"--strategy {spec.strategy} is not implemented yet in the worker; use one of "
            f"{', '.join(SUPPORTED_STRATEGIES)}")


def init_distributed(spec: JobSpec) -> Dist:
    """Join torchrun's process group (RANK, WORLD_SIZE, MASTER_ADDR... in the environment)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but this node has no usable CUDA device; use --device auto or cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # gloo carries the collectives on CPU tensors, which NCCL cannot do: the per-step stop and
        # checkpoint decision (a CPU tensor, so the host never waits for the GPU to learn it), and
        # under CPU offload the loading and clipping of the parameters that live on the CPU.
        dist.init_process_group(backend="cuda:nccl,cpu:gloo", device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    # torchrun sets OMP_NUM_THREADS=1; without a share of the cores each CPU step is 3-10x slower.
    # Affinity, not os.cpu_count(): under SLURM a task sees only the cores it was given.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size,
                local_world_size=local_world_size, device=device)


def teardown() -> None:
    """Leave the process group, after collecting what is no longer reachable. Why the collection:
    FSDP modules sit in reference cycles (and hold the group through their device mesh); left for the
    interpreter's exit, a gloo process sometimes aborted after a successful run (SIGABRT, "terminate
    called without an active exception"): 3 of about 60 two-rank launches of a test script, none of
    40 once the models were collected before the group was destroyed."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, spec: JobSpec, device: torch.device) -> nn.Module:
    """FSDP2: shard each decoder layer (its own all-gather/reduce-scatter unit), then the root
    (embeddings, final norm, head). In place; returns the model for readability."""
    check_strategy(spec)
    if device.type == "cuda":
        # bf16 compute and all-gathers; fp32 gradient reduction and fp32 master weights (the sharded
        # parameters keep the dtype they were built in).
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()  # plain fp32: CPUs gain little from bf16
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if spec.strategy == "fsdp-offload" \
        else OffloadPolicy()
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    for i, layer in enumerate(layers):
        if spec.compile:
            # Compile the layer's forward, not the module: FSDP's hooks stay outside the graph and
            # parameter names stay unchanged (no _orig_mod prefix in checkpoints).
            layer.forward = torch.compile(layer.forward)
        # The last layer's parameters are needed again right away by the backward: keep them.
        fully_shard(layer, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp_policy, offload_policy=offload)
    return model


def init_device(spec: JobSpec, device: torch.device) -> torch.device:
    """Where the sharded parameters live: the CPU under offload, else the compute device."""
    return torch.device("cpu") if spec.strategy == "fsdp-offload" else device


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over sharded (DTensor) gradients; returns the norm (no host sync).

    Split like torchtitan: the norm of DTensor gradients is a partial result that must be reduced
    over the shards (full_tensor) before it scales them.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm, foreach=True)
    return total_norm
