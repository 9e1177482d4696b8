"""Distributed setup and the strategies: how the model is built, stepped and gathered under each.

    fsdp, fsdp-offload      Fsdp: FSDP2 full shard per decoder layer (bf16 compute on GPU); -offload
                            keeps parameters, gradients and optimizer state on the CPU
    ds-zero2[-offload],     Zero (zero.py): DeepSpeed ZeRO-2/3 through deepspeed.initialize under the
    ds-zero3[-offload]      same torchrun launch; -offload moves the optimizer (ZeRO-3: and parameters)
    pp                      LayerSplit: one process per node, the decoder layers split contiguously
                            over the node's devices; slow, for debugging

train.py and checkpoint.py call only the hooks of Strategy (train.ENGINES maps the catalog's engine to
its class); everything a strategy does differently (the model, the optimizer, the step, the checkpoint
format, final/) lives behind them. Which strategy and mode combinations run is JobSpec validation's
to say; only what the node alone can tell is checked here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.elastic.multiprocessing.errors import get_error_handler
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig

from llamajobs import catalog
from llamajobs.spec import DebugSpec, JobSpec
from llamajobs.values import device_type
from llamajobs.worker import model as model_lib
from llamajobs.worker.faults import lose_a_rank, slow_writer
from llamajobs.worker.kernels import Kernels

# The start-up preflight gives every rank this long to join (or the collective timeout, if shorter).
PREFLIGHT_TIMEOUT = timedelta(minutes=5)
PREFLIGHT_KEYS = "llamajobs/preflight"  # its keys in the rendezvous store (+ torchrun's restart count)
# ignore_frozen_params: a LoRA checkpoint holds the adapters, not the base. strict=False because the
# base is then absent from what is loaded; nothing goes missing unnoticed: dcp.load fails on any
# requested (trainable) entry the checkpoint lacks.
STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
DCP_METADATA = ".metadata"  # written last by dcp.save: a folder without it holds no DCP checkpoint


@dataclass(frozen=True, slots=True)
class Dist:
    """Where this process sits: torchrun's environment (or the deepspeed launcher's), resolved once."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    hosts: tuple[str, ...] = ()  # every rank's host, by rank (gathered once, by the start-up preflight)


def init_distributed(spec: JobSpec) -> Dist:
    """Join the launcher's process group (RANK, WORLD_SIZE, MASTER_ADDR... in the environment)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # torchrun says LOCAL_WORLD_SIZE; DeepSpeed's launcher says LOCAL_SIZE.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    if device_type(spec.device, torch.cuda.is_available()) == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # gloo carries the collectives on CPU tensors, which NCCL cannot do: the per-step stop and
        # checkpoint decision (a CPU tensor, so the host never waits for the GPU to learn it), and
        # under CPU offload the loading and clipping of the parameters that live on the CPU. pp's one
        # process drives all the node's GPUs: NCCL is not bound to one of them.
        bound = None if spec.strategy_info.one_process_per_node else device
        backend, options = "cuda:nccl,cpu:gloo", {"device_id": bound}
    else:
        device = torch.device("cpu")
        backend, options = "gloo", {}
    timeout = timedelta(minutes=spec.collective_timeout_minutes)
    # The rendezvous init_process_group would do, done here to keep the store for the preflight.
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    hosts = preflight(store, rank, world_size, device, min(timeout, PREFLIGHT_TIMEOUT), debug=spec.debug,
                      join=lambda: dist.init_process_group(backend=backend, store=store, rank=rank,
                                                           world_size=world_size, timeout=timeout, **options))
    # torchrun sets OMP_NUM_THREADS=1; without a share of the cores each CPU step is 3-10x slower.
    # Affinity, not os.cpu_count(): under SLURM a task sees only the cores it was given.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size,
                local_world_size=local_world_size, device=device, hosts=tuple(hosts))


# The preflight's stages, in order: each rank marks in the store the last one it reached.
STAGES = {
    "arrived": "reached the rendezvous but did not start joining the process group",
    "joining": "did not finish joining the process group (every pair of hosts must reach each other)",
    "joined": "joined the process group but did not finish the first collectives",
    "passed": "passed",
}


def preflight(store: dist.Store, rank: int, world_size: int, device: torch.device, timeout: timedelta, *,
              debug: DebugSpec, join: Callable[[], None]) -> list[str]:
    """Join the process group (`join`), then one all_gather of the hosts and one all_reduce on the
    device, all within `timeout`; returns every rank's host.

    Why: torchrun's rendezvous only shows that every node reached the store. A node that cannot
    reach the others (a wrong network interface, a firewall) would hang the first collective until
    the collective timeout and then fail naming no one. Each rank marks its stage in the store, and
    a watchdog thread, when `timeout` passes first, names the ranks and hosts that lag, records that
    as this rank's error (torchrun's error file, which `status` reads) and ends the process. Cost: a
    few store writes and two tiny collectives."""
    host = socket.gethostname()
    keys = preflight_keys(store)
    keys.set(f"arrived/{rank}", host)
    lose_a_rank(debug, 0, rank, world_size)  # fault injection (hang at 0): a rank that rendezvoused, no further
    done = threading.Event()
    watchdog = threading.Thread(target=_preflight_watchdog, args=(done, store, world_size, timeout), daemon=True)
    watchdog.start()
    try:
        keys.set(f"joining/{rank}", host)
        join()
        keys.set(f"joined/{rank}", host)
        hosts: list[str] = [""] * world_size
        dist.all_gather_object(hosts, host)
        dist.all_reduce(torch.ones(1, device=device))  # on a GPU, the first NCCL collective
        keys.set(f"passed/{rank}", host)
    finally:
        done.set()  # (an error raised here is the rank's own and says more than the watchdog would)
    return hosts


def _preflight_watchdog(done: threading.Event, store: dist.Store, world_size: int, timeout: timedelta) -> None:
    if done.wait(timeout.total_seconds()):
        return
    message = preflight_report(preflight_keys(store.clone()), world_size, timeout)
    get_error_handler().record_exception(RuntimeError(message))  # torchrun's error file: `status` shows it
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # the main thread is blocked inside a collective: nothing else can end it


def preflight_keys(store: dist.Store) -> dist.Store:
    """This launch's preflight keys: torchrun's store outlives a restart, whose ranks start over."""
    return dist.PrefixStore(f"{PREFLIGHT_KEYS}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def preflight_report(keys: dist.Store, world_size: int, timeout: timedelta) -> str:
    """Which ranks (and hosts) lag furthest behind in the preflight: the others wait for them."""
    stages: dict[int, tuple[int, str]] = {}  # rank -> (index of its stage, its host); absent: never arrived
    for rank in range(world_size):
        for index, stage in reversed(list(enumerate(STAGES))):
            if keys.check([f"{stage}/{rank}"]):
                stages[rank] = (index, keys.get(f"{stage}/{rank}").decode())
                break
    seconds = f"{timeout.total_seconds():g} s"
    absent = [r for r in range(world_size) if r not in stages]
    if absent:
        return (f"preflight: rank(s) {', '.join(map(str, absent))} of {world_size} never reached the rendezvous "
                f"store within {seconds} (not started, or died at start-up: see their logs)")
    lowest = min(index for index, _ in stages.values())
    lagging = ", ".join(f"rank {r} on {host}" for r, (index, host) in stages.items() if index == lowest)
    return (f"preflight: {lagging} {list(STAGES.values())[lowest]} within {seconds}; check that node's network "
            f"(site.yaml socket_ifname sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME) and its log")


def teardown() -> None:
    """Leave the process group, after collecting what is no longer reachable. Why the collection:
    FSDP modules sit in reference cycles (and hold the group through their device mesh); left for the
    interpreter's exit, a gloo process sometimes aborted after a successful run (SIGABRT, "terminate
    called without an active exception"): 3 of about 60 two-rank launches of a test script, none of
    40 once the models were collected before the group was destroyed."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


class Strategy(ABC):
    """What differs between strategies, as hooks. The model passed to the hooks is what build_model
    and wrap returned (for DeepSpeed: the engine); unwrap gives the Hugging Face (or peft) module.
    The defaults are FSDP2's and pp's: torch's AdamW, checkpoints in torch.distributed.checkpoint (DCP)."""

    checkpoint_format = "DCP"  # what a refusal of another format's checkpoint calls this one

    def __init__(self, spec: JobSpec, env: Dist | None) -> None:
        self.spec = spec
        self.env = env

    # --- building ---

    @abstractmethod
    def build_model(self, config: LlamaConfig, *, load_weights: bool, chosen: Kernels) -> nn.Module:
        """This rank's model with the starting weights (rank 0's, the same everywhere); without
        load_weights, allocated but uninitialised, for a checkpoint to fill. `chosen`: the kernels
        train() decided for this process's device."""

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW over the parameter groups (train.build_optimizer makes them). fused: one kernel per step
        on GPU, and on the CPU under fsdp-offload (bench/cpu_adam.py: 692 M parameters/s per core against
        104 for the default for-loop); a CPU run keeps the default."""
        fused = self.env.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.spec.lr, fused=fused or None)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model and optimizer the loop steps (DeepSpeed: its engine and ZeRO optimizer)."""
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def devices_per_process(self) -> int:
        return 1

    def describe(self, run_dir: Path) -> str:
        """What rank 0 prints about the strategy at start-up, beyond its name ("" for nothing)."""
        return ""

    # --- one optimizer step ---

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around each micro-batch's forward (FSDP and DeepSpeed cast by themselves)."""
        return contextlib.nullcontext()

    def set_gradient_sync(self, model: nn.Module, sync: bool) -> None:
        """Before each micro-batch's forward: whether its backward reduces the gradients (the last)."""

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(params); the loss is already scaled for the global batch."""
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             max_norm: float) -> torch.Tensor:
        """Clip the gradients, step the optimizer, zero the gradients; returns the norm before clipping."""
        grad_norm = clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # --- checkpoints: the model's and optimizer's part of step-N/ (checkpoint.py writes the rest) ---

    def check_checkpoint(self, folder: Path, meta: dict) -> None:
        """Refuse, with the setting to change, a checkpoint this strategy cannot resume from."""
        if not (folder / DCP_METADATA).is_file():
            raise ValueError(other_format(folder, meta, self.checkpoint_format))

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Collective: every rank writes its shards of the model and the optimizer into folder (DCP
        syncs its files). A frozen base is not saved: start-up rebuilds it, exactly as the first
        attempt built it."""
        model_state, optimizer_state = self._dcp_state(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)

    @property
    def async_checkpoints(self) -> bool:
        """Whether periodic saves may run in the background (save_checkpoint_async; JobSpec.async_checkpoints
        says the same to the estimator). Not under offload: the state already lives in host memory,
        and staging would copy the largest user of host RAM a second time."""
        return not self.spec.strategy_info.offload

    def save_checkpoint_async(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                              group: dist.ProcessGroup) -> Future:
        """Collective: copy this rank's shards to host memory now (training may change the originals as
        soon as this returns), and write them into folder in a background thread; the future completes
        when this rank's files are written. `group`: a gloo group of its own, for DCP's collectives
        from that thread, which must never interleave with the training's on the default group."""
        model_state, optimizer_state = self._dcp_state(model, optimizer)
        delay = self.spec.debug.slow_checkpoint_write_s  # (tests: a slow filesystem)
        return dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder,
                              storage_writer=slow_writer(folder, delay) if delay else None, process_group=group)

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Collective: the model's and optimizer's state from folder, in place, each rank its own shards."""
        model_state, optimizer_state = self._dcp_state(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                       options=STATE_OPTIONS)

    def _dcp_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The model's and optimizer's state dicts as DCP saves and loads them. Under a peft mode only
        what is trained: ignore_frozen_params misses the second name peft's prompt learning gives the
        frozen input embedding (word_embeddings), which would put the base's largest matrix in every
        checkpoint."""
        model_state, optimizer_state = get_state_dict(model, optimizer, options=STATE_OPTIONS)
        if self.spec.mode_info.frozen_base:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            model_state = {name: value for name, value in model_state.items() if name in trainable}
        return model_state, optimizer_state

    # --- final/ ---

    @abstractmethod
    def gather(self, model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Collective: the full (unsharded) tensors on rank 0, on the CPU, named as in the unwrapped
        module's state dict; other ranks may get {}. trainable_only: the adapters, not the base."""


def other_format(folder: Path, meta: dict, expected: str) -> str:
    """The refusal of a checkpoint saved in another strategy's format."""
    return (f"{folder} was saved by a --strategy {meta.get('strategy', '?')} run in another format (not {expected}); "
            f"resume it with that strategy, or turn resume off (--no-resume) to start over")


# --- FSDP2 ---


class Fsdp(Strategy):
    def __init__(self, spec: JobSpec, env: Dist | None) -> None:
        super().__init__(spec, env)
        # A single process has nobody to shard with: FSDP would only copy every layer's weights into
        # and out of its all-gather buffers, forward and backward, every step. It runs the plain model
        # (bf16 autocast on GPU, the same mixed precision) unless offload needs FSDP's CPU placement.
        self.sharded = env is None or env.world_size > 1 or spec.strategy_info.offload
        self.mesh = shard_mesh(spec, env) if env is not None and self.sharded else None

    def build_model(self, config: LlamaConfig, *, load_weights: bool, chosen: Kernels) -> nn.Module:
        """Structure on the meta device, sharded, only the shards allocated, weights read once (rank 0)
        and broadcast; without load_weights the shards stay uninitialised for a checkpoint to fill."""
        spec, device = self.spec, self.env.device
        model = model_lib.build_meta_model(spec, config, model_lib.weights_dtype(spec, device), chosen)
        if spec.compile:
            compile_layers(model)
        if self.sharded:
            parallelize(model, spec, device, self.mesh)
        model_lib.materialize(model, init_device(spec, device), device)
        if load_weights:
            model_lib.load_weights(model, spec, config, self.env.rank)
        return model

    def describe(self, run_dir: Path) -> str:
        if self.mesh is not None:
            replicas, shard = self.mesh.shape
            return (f"fsdp: hybrid sharding (--shard-within node): each layer sharded over the {shard} rank(s) of "
                    f"a node, replicated across {replicas} nodes")
        if self.sharded:
            return ""
        return "fsdp over one process: nothing to shard, the model runs unsharded" + (
            " under bf16 autocast" if self.env.device.type == "cuda" else "")

    def autocast(self) -> contextlib.AbstractContextManager:
        # (sharded: FSDP's mixed precision casts)
        return contextlib.nullcontext() if self.sharded else bf16_autocast(self.env.device)

    def set_gradient_sync(self, model: nn.Module, sync: bool) -> None:
        # Unsharded accumulation: reduce-scatter only after the last micro-batch; the others
        # accumulate locally, in unsharded fp32 gradients (for a full fine-tune, a whole model's worth
        # per GPU). Sharded accumulation (the spec's choice when that does not fit): reduce-scatter
        # every micro-batch, FSDP2 adding each result into the sharded gradient.
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync or self.spec.sharded_accumulation)

    def gather(self, model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        if trainable_only:  # small: every rank gathers them (full_tensor is a collective)
            return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                    for name, p in model.named_parameters() if p.requires_grad}
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_mesh(spec: JobSpec, env: Dist) -> DeviceMesh | None:
    """The 2-D mesh of --shard-within node on several nodes: ("replicate", "shard") = (nodes, ranks per
    node). torchrun numbers ranks node by node, so each row is one node's ranks: the all-gathers and
    reduce-scatters run inside a node, and the gradient all-reduce across the rows once per step.
    None: FSDP's default 1-D mesh over every rank (--shard-within all; auto left unresolved, a run
    not planned on GPUs; one node, where both layouts are the same).

    Ranks per node: the launcher's LOCAL_WORLD_SIZE, or debug.ranks_per_node (a test's 2 processes
    of one host as 2 nodes)."""
    if spec.shard_within != "node":
        return None
    per_node = spec.debug.ranks_per_node or env.local_world_size
    if env.world_size % per_node:
        raise ValueError(f"--shard-within node: {env.world_size} ranks are not whole nodes of {per_node}; "
                         f"use --shard-within all")
    if env.world_size == per_node:
        return None
    return init_device_mesh(env.device.type, (env.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, spec: JobSpec, device: torch.device, mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2: shard each decoder layer (its own all-gather/reduce-scatter unit), then the root
    (embeddings, final norm, head, a prompt encoder). In place; returns the model for readability.
    A 2-D `mesh` (shard_mesh) makes it HSDP: sharded along "shard", replicated along "replicate"."""
    if not spec.strategy_info.fsdp:
        raise ValueError(f"parallelize shards with FSDP; --strategy {spec.strategy} is not an FSDP strategy")
    if device.type == "cuda":
        # bf16 compute and all-gathers; fp32 gradient reduction and fp32 master weights (the sharded
        # parameters keep the dtype they were built in).
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()  # plain fp32: CPUs gain little from bf16
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if spec.strategy_info.offload else OffloadPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again right away by the backward: keep them.
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    return model


def _family(model: nn.Module) -> catalog.Family:
    return catalog.family_of(model.config.model_type)  # (a peft model passes config through)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The family's decoder blocks, found by the class name the catalog gives (FSDP's wrapping unit)."""
    name = _family(model).decoder_layer
    return [m for m in model.modules() if type(m).__name__ == name]


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer's forward, not the module: FSDP's hooks stay outside the
    graph and parameter names stay unchanged (no _orig_mod prefix in checkpoints). The layers share
    one code object, so one graph serves them all (parameters are graph inputs, not constants)."""
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward)


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 compute on GPU over the weights as they are (a full fine-tune keeps fp32 weights, as
    FSDP's mixed precision does); nothing on the CPU, where bf16 gains little."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_device(spec: JobSpec, device: torch.device) -> torch.device:
    """Where the sharded parameters live: the CPU under offload, else the compute device."""
    return torch.device("cpu") if spec.strategy_info.offload else device


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


# --- pp: the naive layer split ---


class LayerSplit(Strategy):
    """One process per node drives all of the node's GPUs: embeddings (and a prompt encoder) on the
    first, the decoder layers split contiguously, the final norm and the head on the last; each part
    moves its inputs to its own device (forward pre-hooks), so one GPU computes at a time. On a CPU
    node everything is on the CPU. Between nodes (one process each) the gradients are all-reduced:
    plain data parallelism, every process holding the whole model."""

    @property
    def devices(self) -> list[torch.device]:
        if self.env.device.type == "cuda":
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [self.env.device]

    @property
    def devices_per_process(self) -> int:
        return len(self.devices)

    def describe(self, run_dir: Path) -> str:
        names = ", ".join(str(d) for d in self.devices)
        return f"pp: the decoder layers split contiguously over {len(self.devices)} device(s) of this process: {names}"

    def autocast(self) -> contextlib.AbstractContextManager:
        return bf16_autocast(self.env.device)

    def build_model(self, config: LlamaConfig, *, load_weights: bool, chosen: Kernels) -> nn.Module:
        """Every process (one per node) reads or initialises the weights itself: once per node."""
        spec, devices = self.spec, self.devices  # (train.check_node checked the processes and devices)
        model = model_lib.build_meta_model(spec, config, model_lib.weights_dtype(spec, devices[0]), chosen)
        placement = dict(split_layers(model, devices))
        model_lib.materialize(model, devices[0], devices[0], placement)  # each part allocated on its device
        for module, device in placement.items():
            module.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
        if load_weights:
            # Not strict under prompt learning: peft's alias of the embedding is filled through its first name.
            model.load_state_dict(model_lib._full_state_dict_rank0(spec, config), strict=not spec.mode_info.virtual_tokens)
        return model

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             max_norm: float) -> torch.Tensor:
        world_size = self.env.world_size
        if world_size > 1:  # each node's gradient is its share of the global mean times world_size
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
        return super().step(model, optimizer, params, max_norm)

    def gather(self, model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        if trainable_only:
            return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
        return {name: t.detach().cpu() for name, t in model.state_dict().items()}


def split_layers(model: nn.Module, devices: list[torch.device]) -> list[tuple[nn.Module, torch.device]]:
    """Contiguous placement: decoder layer i of L on devices[i * len(devices) // L]; the final norm
    and the head on the last device. What is not listed (embeddings, rotary, a prompt encoder) stays
    on the first."""
    layers = decoder_layers(model)
    causal_lm = next(m for m in model.modules() if type(m).__name__ == _family(model).architecture)
    decoder, head = causal_lm.model, causal_lm.lm_head
    placement = [(layer, devices[i * len(devices) // len(layers)]) for i, layer in enumerate(layers)]
    return placement + [(decoder.norm, devices[-1]), (head, devices[-1])]


def _inputs_to(device: torch.device):
    """A forward pre-hook that moves every tensor among a module's inputs (in tuples, lists and
    dicts too: the rotary (cos, sin) pair) to `device`; anything else passes as it is."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(item) for item in x)
        if isinstance(x, dict):
            return {key: move(value) for key, value in x.items()}
        return x

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return move(args), move(kwargs)
    return hook
