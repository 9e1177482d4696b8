"""DeepSpeed ZeRO: ds-zero2, ds-zero2-offload, ds-zero3, ds-zero3-offload, under the same torchrun
launch as FSDP (deepspeed.initialize reads torchrun's environment and adopts its process group).

    ds-zero2          gradients and optimizer state partitioned, each rank a whole 16-bit model
    ds-zero2-offload  the same, the fp32 master weights and Adam's moments on the CPU (CPU Adam)
    ds-zero3          the parameters partitioned too, gathered layer by layer for compute
    ds-zero3-offload  and offloaded to the CPU (pinned), optimizer too

The config is built from spec.json as a dict (zero_config.ds_config, which render.py also writes
into ds_config.json), here with this node's world size and device. The loop's semantics are the
FSDP path's: one optimizer step per global batch (unmanaged gradient accumulation: backward() only
accumulates, step() is the boundary), the loss of each micro-batch already normalised by the global batch's
label tokens, so backward() is told not to divide by the accumulation steps again; like FSDP,
DeepSpeed averages the gradients over ranks, which the world_size factor of forward_backward undoes.

Host memory: ZeRO-3 builds the model inside zero.Init (each layer partitioned as soon as it is
built), ZeRO-2 on the meta device; either way rank 0 alone reads (or initialises) the full weights
and broadcasts them, so a node's RAM holds the model once, not once per rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaConfig

from llamajobs.spec import JobSpec
from llamajobs.worker import model as model_lib
from llamajobs.worker.faults import simulate_cpu
from llamajobs.worker.kernels import Kernels
from llamajobs.worker.parallel import Dist, Strategy, other_format
from llamajobs.worker.zero_config import DS_CONFIG, ds_config


def fp32_only(accelerator) -> None:
    """On the CPU our runs are fp32, whatever the CPU offers. DeepSpeed 0.19 takes dtypes from its
    accelerator's answers: the CPU one says bf16 always and fp16 where oneDNN has it (AMX, avx512_fp16),
    and zero.Init given a dtype, or no config, picks fp16 where supported, else bf16 (it tests
    `is_bf16_supported` without calling it: always true). So this accelerator answers fp32 only,
    zero.Init always gets our config and no dtype, and check_fp32 fails loudly if any parameter is
    16-bit anyway: a 16-bit copy would make resume inexact (fp32 masters against rounded weights)."""
    accelerator.is_bf16_supported = lambda: False
    accelerator.is_fp16_supported = lambda: False
    accelerator.supported_dtypes = lambda: [torch.float32]


def check_fp32(model: nn.Module, when: str) -> None:
    """Every parameter of a CPU run fp32, ZeRO-3's partitions (ds_tensor) included."""
    for name, param in model.named_parameters():
        for tensor in (param, getattr(param, "ds_tensor", None)):
            if tensor is not None and tensor.dtype != torch.float32:
                raise RuntimeError(f"{name} is {tensor.dtype} after the model was {when}; a CPU run must be float32 "
                                   f"(DeepSpeed chose a 16-bit dtype on this CPU)")


# DeepSpeed's checkpoint inside step-N: its "tag", a subdirectory (with no `latest` of DeepSpeed's own).
ENGINE_TAG = "engine"


class Zero(Strategy):
    checkpoint_format = "DeepSpeed's"
    async_checkpoints = False  # the engine's save_checkpoint writes synchronously

    def __init__(self, spec: JobSpec, env: Dist | None) -> None:
        super().__init__(spec, env)
        self.stage = spec.strategy_info.zero_stage
        self.offload_param = spec.strategy_info.offload_params

    @property
    def cuda(self) -> bool:
        return self.env.device.type == "cuda"

    @property
    def config(self) -> dict:
        """The DeepSpeed config of this node's real world size and device."""
        return ds_config(self.spec, world_size=self.env.world_size, cuda=self.cuda)

    @property
    def dtype(self) -> torch.dtype:
        """16-bit weights on GPU (the fp32 masters live in the optimizer), fp32 on the CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    # --- building ---

    def build_model(self, config: LlamaConfig, *, load_weights: bool, chosen: Kernels) -> nn.Module:
        import deepspeed

        # Its INFO log repeats the whole config and each step's timers: our own lines say what matters.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 still calls these torch.distributed names: one warning per call, every step.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                                r"(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        simulate_cpu(self.spec.debug)  # tests: DeepSpeed's answers on a CPU with bf16/fp16 instructions
        if not self.cuda:
            fp32_only(deepspeed.get_accelerator())
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")  # adopts the existing group
        if self.stage == 3:
            # Each rank's layers are initialised for real (and overwritten by rank 0's weights): under a
            # forked generator, so that the ranks' random streams (dropout) are those of the other
            # strategies, which build on the meta device and draw nothing. The dtype comes from the
            # config (bf16 on GPU, fp32 on the CPU): DeepSpeed 0.19 ignores an explicit fp32 on an
            # accelerator without fp16 (its CPU one) and builds bf16 parameters.
            devices = [self.env.device] if self.cuda else []
            # The modeling module is imported before zero.Init, never inside it: zero.Init wraps every
            # module class's __init__ and puts back, on exit, the one it found, so a class defined inside
            # it loses what decorators set after its definition (transformers' use_kernelized_func: every
            # later model of that class in the process fails with "no attribute '_kernel_funcs'").
            model_lib.causal_lm_class(config)
            if self.spec.mode_info.frozen_base:
                import peft  # noqa: F401  (its layer classes, for the same reason)
            with torch.random.fork_rng(devices=devices), \
                    deepspeed.zero.Init(config_dict_or_path=self.config, dtype=None,
                                        remote_device="cpu" if self.offload_param else None,
                                        pin_memory=self.cuda and self.offload_param):
                model = model_lib.build_structure(self.spec, config, self.dtype, chosen)
        else:
            model = model_lib.build_meta_model(self.spec, config, self.dtype, chosen)
            model_lib.materialize(model, self.env.device, self.env.device)
        if load_weights:
            self._load_rank0(model, config)
        if not self.cuda:
            check_fp32(model, "built")
        return model

    def _load_rank0(self, model: nn.Module, config: LlamaConfig) -> None:
        """Rank 0's weights (read or initialised there alone) into every rank's model, one parameter at
        a time: ZeRO-3 gathers each partitioned parameter, rank 0 writes it, leaving the context
        broadcasts and partitions it again; ZeRO-2's replicas are broadcast."""
        import deepspeed

        rank = self.env.rank
        state = model_lib._full_state_dict_rank0(self.spec, config) if rank == 0 else {}
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]  # a tied head named too
        if rank == 0 and set(names) != set(state):
            missing, unexpected = sorted(set(names) - set(state))[:3], sorted(set(state) - set(names))[:3]
            raise RuntimeError(f"the starting weights do not fit the model: missing {missing}, unexpected {unexpected}")
        for name, param in model.named_parameters():
            partitioned = self.stage == 3
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=partitioned), torch.no_grad():
                if rank == 0:
                    param.copy_(state.pop(name))  # (to the model's dtype and device)
                if not partitioned:
                    dist.broadcast(param.data, src=0)

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """ZeRO's optimizer offload requires DeepSpeed's CPU Adam (the same update, a C++ kernel over the
        CPU-resident fp32 masters) in AdamW mode: decoupled weight decay, torch's betas and eps. Its
        extension is compiled on first use (about a minute) into TORCH_EXTENSIONS_DIR, where later runs
        find it. Without offload, torch's AdamW as under FSDP."""
        if not self.spec.strategy_info.offload_optimizer:
            return super().build_optimizer(groups)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=self.spec.lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                            dist_init_required=False)
        if not self.cuda:
            check_fp32(engine.module, "wrapped by deepspeed.initialize")
        return engine, zero_optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def describe(self, run_dir: Path) -> str:
        """One line on what runs; notes a run dir ds_config.json that is not spec.json's rendering."""
        config = self.config
        zero = config["zero_optimization"]
        offloaded = [what for what in ("optimizer", "param") if f"offload_{what}" in zero]
        line = (f"deepspeed: ZeRO-{zero['stage']}, offload {'+'.join(offloaded) or 'none'}, "
                f"{'bf16' if config['bf16']['enabled'] else 'fp32'}, {config['gradient_accumulation_steps']} "
                f"micro-batches per step, clip {config['gradient_clipping']} (config from spec.json)")
        planned = run_dir / DS_CONFIG
        if planned.is_file() and json.loads(planned.read_text()) != ds_config(self.spec):
            line += (f"\nwarning: {planned} differs from spec.json's rendering; the worker renders its config from "
                     f"spec.json (edit the spec, not ds_config.json)")
        return line

    # --- one optimizer step ---

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the loss is already the global batch's share

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
             max_norm: float) -> torch.Tensor:
        model.step()  # the accumulation boundary: reduce, clip (gradient_clipping), update, zero the gradients
        norm = model.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).cpu()

    # --- checkpoints: DeepSpeed's engine files, in step-N/engine ---

    def check_checkpoint(self, folder: Path, meta: dict) -> None:
        if not (folder / ENGINE_TAG).is_dir():
            raise ValueError(other_format(folder, meta, self.checkpoint_format))
        if meta.get("world_size") != self.env.world_size:
            raise ValueError(f"{folder} holds DeepSpeed ZeRO partitions of {meta.get('world_size')} processes and this "
                             f"run has {self.env.world_size}; resume it on {meta.get('world_size')} (--nodes, "
                             f"--procs-per-node), or turn resume off (--no-resume) to start over")

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """The engine saves its module and its ZeRO optimizer's partitions (each rank its own) into
        folder/engine, with no `latest` of its own: checkpoint.py's, written after meta.json, is the only
        one. A frozen base is rebuilt at start-up, as under DCP."""
        model.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False,
                              exclude_frozen_parameters=self.spec.mode_info.frozen_base)
        # DeepSpeed does not sync what it wrote (DCP does): on disk before meta.json vouches for it.
        # Every rank syncs every file: each flushes whatever of them it wrote.
        for path in (folder / ENGINE_TAG).iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        path, _ = model.load_checkpoint(
            str(folder), tag=ENGINE_TAG, load_module_strict=not self.spec.mode_info.frozen_base,
            load_optimizer_states=True, load_lr_scheduler_states=False)  # (the schedule is in train_state.json)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / ENGINE_TAG}")

    # --- final/ ---

    def gather(self, model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        """The 16-bit weights (fp32 on the CPU) gathered onto rank 0, parameter by parameter: ZeRO-3's
        partitions whole again (no placeholders), ZeRO-2's replicas as they are."""
        import deepspeed

        module = model.module
        state: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            gathered = deepspeed.zero.GatheredParameters([param]) if self.stage == 3 else contextlib.nullcontext()
            with gathered:
                if self.env.rank == 0:
                    state[name] = param.detach().cpu().clone()
        if not trainable_only and self.env.rank == 0:
            state.update({name: buffer.detach().cpu() for name, buffer in _persistent_buffers(module)})
        return state


def _persistent_buffers(module: nn.Module):
    """(name, buffer) of the buffers a state dict holds (none in LLaMA; rotary tables are not saved)."""
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buffer
