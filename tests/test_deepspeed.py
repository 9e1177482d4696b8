"""DeepSpeed ZeRO (ds-zero2, ds-zero2-offload, ds-zero3, ds-zero3-offload), the naive layer split
(pp) and peft's prompt-learning modes (prefix, ptuning, prompt): the configs and placements as
units, then real launches on this CPU (2 processes, gloo, the tiny model, seq 64, 6 steps).

The launches run this file under torchrun (see the bottom): one process group trains several run
dirs in turn, so the start-up (imports, rendezvous: most of a launch's time on 2 cores) is paid
once per launch, not per run. Each strategy has two launches, made on first use and shared:
  A  full and LoRA references to the end; full and LoRA runs stopped by a stop request at step 3
  B  the stopped runs resumed, in fresh processes, to the end
so a resume is always a new process reading the checkpoint, as after a requeue (ds-zero3-offload's
runs also recompute their activations). The fsdp launches give the cross-strategy reference and
the prompt-learning modes (each: a reference, and a run stopped at 3 and resumed); pp runs in one
process. One more launch goes through the rendered launch.sh and DeepSpeed's own launcher, one
checks the accumulated ZeRO gradients directly.

Wall time on 2 cores, extensions cached: ds-zero2 18 s, ds-zero2-offload 29 s, ds-zero3 21 s,
ds-zero3-offload 33 s, fsdp and the prompt modes 17 s, pp 12 s, the launcher 10 s, the gradient
check 10 s: about 2.5 minutes for the module.

On the CPU in fp32 a resumed run is bitwise the uninterrupted one under every strategy (losses
compare with ==, weights with torch.equal). Across strategies the same data and seed give the
same curve within CROSS_STRATEGY_RTOL.

DeepSpeed compiles two C++ extensions on first use: CPU Adam for the offload strategies (40 s on
2 cores) and, on the CPU only, a shared-memory communication op for all of them (22 s). They are
cached in TORCH_EXTENSIONS_DIR, which the launches put under the venv unless it is set, so a
machine pays that minute once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs import catalog, events, render
from llamajobs.catalog import SIZES, TINY_VOCAB
from llamajobs.data.sampler import IGNORE_INDEX
from llamajobs.data.tokenizer import load_tokenizer
from llamajobs.site import Site
from llamajobs.spec import DebugSpec, JobSpec
from llamajobs.worker import checkpoint, kernels, parallel, zero, zero_config
from llamajobs.worker import model as model_lib
from llamajobs.worker.parallel import Dist
from llamajobs.worker.train import build_strategy, check_node, check_supported, parse_run_dir
from tests.conftest import REPO, assert_exit_0, assert_same_tensors, debug_section, metrics_rows, torchrun

TORCHRUN_TIMEOUT_S = 600  # (a first offload launch compiles CPU Adam)
ZERO = ["ds-zero2", "ds-zero2-offload", "ds-zero3", "ds-zero3-offload"]
PROMPT_MODES = ["prefix", "ptuning", "prompt"]
BASE = dict(size="tiny", cluster="local", procs_per_node=2, seq_len=64, global_batch=8, micro_batch=2, lr=3e-3,
            max_steps=6, checkpoint_every_steps=2, num_virtual_tokens=4)
STOP = "stop:3"
# Measured on this CPU (fp32, 2 ranks, 6 steps, full and LoRA): fsdp vs ds-zero2 / ds-zero3 differ by
# at most 7.7e-8 relative in the loss and 1.6e-7 in the gradient norm (other reduction orders); the
# offload strategies (DeepSpeed's CPU Adam for torch's AdamW) by 1.6e-7 in the loss and 1.1e-6 in
# the gradient norm; pp (1 process, full) by 8.2e-8. A missing or doubled 1/accumulation or
# 1/world-size factor moves the gradient norm by 2x and the losses by 1e-3 and more.
CROSS_STRATEGY_RTOL = 1e-5


def extensions_env() -> dict[str, str]:
    """Where DeepSpeed's compiled ops (CPU Adam; on the CPU its shared-memory communication op) are
    cached across runs: TORCH_EXTENSIONS_DIR when set, else the venv, else the user's cache."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    venv = Path(sys.prefix)
    folder = venv / "torch_extensions" if os.access(venv, os.W_OK) else Path.home() / ".cache" / "torch_extensions"
    return {"TORCH_EXTENSIONS_DIR": str(folder)}


# --- DeepSpeed's config, rendered from the spec ---


def test_ds_config_is_filled_from_the_spec_with_nothing_left_auto() -> None:
    spec = JobSpec(size="7b", strategy="ds-zero3-offload", cluster="slurm", nodes=2, gpus_per_node=8,
                   global_batch=256, micro_batch=4, grad_clip=0.5)
    config = zero_config.ds_config(spec)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (256, 4)
    assert config["gradient_accumulation_steps"] == 4  # 256 / (4 x 16 ranks)
    assert config["managed_gradient_accumulation"] is False and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}  # SLURM with --device auto: planned on GPUs
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"] == zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["reduce_bucket_size"] == 4096 ** 2 and zero["stage3_param_persistence_threshold"] == 40960
    assert "auto" not in json.dumps(config)
    # On the node: the real world size and device decide.
    on_cpu = zero_config.ds_config(spec, world_size=2, cuda=False)
    assert on_cpu["gradient_accumulation_steps"] == 32 and on_cpu["bf16"] == {"enabled": False}
    assert on_cpu["zero_optimization"]["offload_param"]["pin_memory"] is False
    two = zero_config.ds_config(JobSpec(strategy="ds-zero2", global_batch=8, micro_batch=2), world_size=2, cuda=False)
    assert two["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in two["zero_optimization"]
    assert two["zero_optimization"]["allgather_bucket_size"] == 64 ** 2


def test_render_writes_ds_config_only_for_deepspeed_strategies(tmp_path: Path) -> None:
    spec = JobSpec(strategy="ds-zero2-offload", cluster="slurm")
    written = {p.name for p in render.render(spec, Site(), tmp_path / "ds")}
    assert render.DS_CONFIG in written
    assert json.loads((tmp_path / "ds" / render.DS_CONFIG).read_text()) == render.ds_config(spec)
    assert render.DS_CONFIG not in {p.name for p in render.render(JobSpec(cluster="slurm"), Site(), tmp_path / "f")}


# --- refusals, the launcher's argument, the layer split ---


def test_every_strategy_and_mode_starts_on_a_cpu_node() -> None:
    """Each strategy x mode pair the spec accepts on the local cluster passes the worker's start-up
    checks in the environment the launch would give it; and on a CPU node the spec accepts them all."""
    started = set()
    for strategy in catalog.STRATEGIES:
        for mode in catalog.MODES:
            spec = JobSpec(strategy=strategy, mode=mode)
            check_supported(spec)
            env = Dist(rank=0, local_rank=0, world_size=spec.world_size, local_world_size=spec.planned_procs_per_node,
                       device=torch.device("cpu"))
            check_node(spec, env, devices_per_process=1)
            started.add((strategy, mode))
    assert started == {(s, m) for s in catalog.STRATEGIES for m in catalog.MODES}


@pytest.mark.parametrize("args, named", [
    (["--mode", "prompt", "--merge"], "--merge folds LoRA adapters into the base; --mode prompt has none"),
    (["--strategy", "ds-zero3", "--compile"], "--compile is implemented for fsdp and fsdp-offload"),
    (["--strategy", "pp", "--procs-per-node", "2"], "--strategy pp runs one process per node"),
])
def test_submit_refuses_what_the_worker_cannot_do_before_queueing(cli, args: list[str], named: str) -> None:
    code, _, stderr = cli("submit", "--cluster", "local", *args)
    assert code == 2 and named in stderr


def test_the_deepspeed_launchers_local_rank_argument_is_ignored() -> None:
    assert parse_run_dir(["--local_rank=3", "/runs/7"]) == Path("/runs/7")
    assert parse_run_dir(["/runs/7"]) == Path("/runs/7")
    with pytest.raises(SystemExit, match="usage"):
        parse_run_dir(["/runs/7", "/runs/8"])


def test_layers_are_split_contiguously_embeddings_first_head_last() -> None:
    config = LlamaConfig(**{**SIZES["tiny"].hf_config(), "num_hidden_layers": 7})
    spec = JobSpec(mode="lora")
    model = model_lib.build_meta_model(spec, config, torch.float32, kernels.choose(spec, "cpu"))
    devices = [torch.device("cuda", i) for i in range(3)]  # (only named: nothing is allocated)
    placement = parallel.split_layers(model, devices)
    layers = [d.index for _, d in placement[:7]]
    assert layers == [0, 0, 0, 1, 1, 2, 2] and layers == sorted(layers)
    assert [(type(m).__name__, d.index) for m, d in placement[7:]] == [("LlamaRMSNorm", 2), ("Linear", 2)]
    assert placement[-1][0] is model.base_model.model.lm_head
    assert len(parallel.split_layers(model, devices[:1])) == 9  # one device: all of it there


def test_each_part_is_allocated_on_its_own_device() -> None:
    """Never the whole model on the first GPU first: the meta device stands in for a second one."""
    config = LlamaConfig(**{**SIZES["tiny"].hf_config(), "num_hidden_layers": 4})
    spec = JobSpec(mode="prompt", num_virtual_tokens=4)
    model = model_lib.build_meta_model(spec, config, torch.float32, kernels.choose(spec, "cpu"))
    devices = [torch.device("cpu"), torch.device("meta")]
    model_lib.materialize(model, devices[0], devices[0], dict(parallel.split_layers(model, devices)))
    second = (".layers.2.", ".layers.3.", "lm_head.", "model.norm.")
    for name, p in model.named_parameters():
        assert p.device.type == ("meta" if any(part in name for part in second) else "cpu"), name
    assert model.prompt_tokens["default"].tolist() == [0, 1, 2, 3]  # (peft's arange, real again)


def test_each_part_moves_its_inputs_to_its_device() -> None:
    hook = parallel._inputs_to(torch.device("meta"))
    cos_sin = (torch.ones(2), torch.ones(2))
    args, kwargs = hook(None, (torch.ones(3), 5), {"position_embeddings": cos_sin, "cache": object()})
    assert args[0].is_meta and args[1] == 5
    assert all(t.is_meta for t in kwargs["position_embeddings"]) and not isinstance(kwargs["cache"], torch.Tensor)


def test_engine_checkpoints_resume_only_on_their_world_size_and_format(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-4"
    (folder / zero.ENGINE_TAG).mkdir(parents=True)
    (folder / checkpoint.META).write_text('{"complete": true, "mode": "full", "world_size": 8, "strategy": "ds-zero3"}')
    env = Dist(rank=0, local_rank=0, world_size=2, local_world_size=2, device=torch.device("cpu"))
    for name, refusal in [("ds-zero3", "ZeRO partitions of 8 processes and this run has 2; resume it on 8"),
                          ("fsdp", r"--strategy ds-zero3 run in another format \(not DCP\)")]:
        spec = JobSpec(strategy=name)
        with pytest.raises(ValueError, match=refusal):
            checkpoint.Checkpointer.resume(SimpleNamespace(root=tmp_path / "checkpoints", spec=spec, env=env,
                                                           strategy=build_strategy(spec, env)), 4)


# --- launches ---


def _torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return torchrun(*args, nproc=nproc, env={**extensions_env(), **(env or {})}, timeout=TORCHRUN_TIMEOUT_S)


def _train(*runs: tuple[Path, str | None], nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One launch training each (run dir, fault) in turn: this file's `train` mode (see the bottom)."""
    result = _torchrun(str(Path(__file__)), "train", *(f"{d}@{fault or ''}" for d, fault in runs), nproc=nproc,
                       env=env)
    assert_exit_0(result)
    return result


@pytest.fixture(scope="module")
def new_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """A run dir with spec.json and the bundled tokenizer already trained (as a requeued run has it)."""
    def make(name: str, **spec: object) -> Path:
        run_dir = tmp_path_factory.mktemp(name)
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
        (run_dir / "spec.json").write_text(JobSpec(**{**BASE, **spec}).to_json())
        return run_dir
    return make


def _pairs(new_run, prefix: str, modes: list[str], **spec: object) -> dict[str, SimpleNamespace]:
    """For each mode: a reference run dir and one to be interrupted."""
    return {mode: SimpleNamespace(ref=new_run(f"{prefix}-{mode}-ref", mode=mode, **spec),
                                  int=new_run(f"{prefix}-{mode}-int", mode=mode, **spec)) for mode in modes}


def _stop_then_resume(pairs: dict[str, SimpleNamespace], nproc: int = 2) -> dict[str, float]:
    """Launch A (references, and the stopped runs), then launch B (the resumes); their wall times."""
    start = time.perf_counter()
    _train(*[(p.ref, None) for p in pairs.values()], *[(p.int, STOP) for p in pairs.values()], nproc=nproc)
    middle = time.perf_counter()
    _train(*[(p.int, None) for p in pairs.values()], nproc=nproc)
    return {"A": middle - start, "B": time.perf_counter() - middle}


@pytest.fixture(scope="module")
def zero_runs(new_run):
    """zero_runs(strategy): its full and LoRA pairs, launched on first use."""
    cache: dict[str, dict[str, SimpleNamespace]] = {}

    def get(strategy: str) -> dict[str, SimpleNamespace]:
        if strategy not in cache:
            # The most constrained strategy also recomputes its activations (the same numbers, bitwise).
            extra = {"activation_checkpointing": True} if strategy == "ds-zero3-offload" else {}
            pairs = _pairs(new_run, strategy, ["full", "lora"], strategy=strategy, **extra)
            seconds = _stop_then_resume(pairs)
            print(f"{strategy}: launch A {seconds['A']:.1f} s, launch B {seconds['B']:.1f} s")
            cache[strategy] = pairs
        return cache[strategy]
    return get


@pytest.fixture(scope="module")
def fsdp_runs(new_run) -> dict[str, SimpleNamespace]:
    """fsdp: full and LoRA references (for the cross-strategy curves), and the prompt-learning modes."""
    pairs = _pairs(new_run, "fsdp", PROMPT_MODES, strategy="fsdp")
    full, lora = new_run("fsdp-full-ref", strategy="fsdp"), new_run("fsdp-lora-ref", strategy="fsdp", mode="lora")
    start = time.perf_counter()
    _train((full, None), (lora, None), *[(p.ref, None) for p in pairs.values()],
           *[(p.int, STOP) for p in pairs.values()])
    middle = time.perf_counter()
    _train(*[(p.int, None) for p in pairs.values()])
    print(f"fsdp + prompt modes: launch A {middle - start:.1f} s, launch B {time.perf_counter() - middle:.1f} s")
    return {**pairs, "full": SimpleNamespace(ref=full), "lora": SimpleNamespace(ref=lora)}


@pytest.fixture(scope="module")
def pp_runs(new_run) -> dict[str, SimpleNamespace]:
    """pp in one process: a full reference, a full run stopped and resumed, a LoRA run."""
    full = _pairs(new_run, "pp", ["full"], strategy="pp", procs_per_node=1)["full"]
    lora = new_run("pp-lora-ref", strategy="pp", procs_per_node=1, mode="lora")
    start = time.perf_counter()
    _train((full.ref, None), (lora, None), (full.int, STOP), nproc=1)
    middle = time.perf_counter()
    _train((full.int, None), nproc=1)
    print(f"pp: launch A {middle - start:.1f} s, launch B {time.perf_counter() - middle:.1f} s")
    return {"full": full, "lora": SimpleNamespace(ref=lora)}


def _losses(run_dir: Path) -> list[float]:
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    return [r["loss"] for r in rows]


def _final(run_dir: Path, mode: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / ("model.safetensors" if mode == "full" else "adapter_model.safetensors"))


def _assert_resumed_exactly(pair: SimpleNamespace, mode: str) -> None:
    assert _losses(pair.int) == _losses(pair.ref)
    assert_same_tensors(_final(pair.int, mode), _final(pair.ref, mode))
    recorded = [(e["event"], e.get("step")) for e in events.read(pair.int) if e["event"] != "checkpointed"]
    assert recorded == [("started", None), ("stopped", 3), ("started", None), ("resumed", 3), ("finished", 6)]


def _random_base() -> LlamaForCausalLM:
    """The tiny random init the worker uses without --model-path (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].hf_config()))


# --- ZeRO: every strategy x {full, lora} trains, resumes exactly and exports ---


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ZERO)
def test_zero_resumes_bitwise_under_full_and_lora(zero_runs, strategy: str) -> None:
    runs = zero_runs(strategy)
    for mode in ("full", "lora"):
        _assert_resumed_exactly(runs[mode], mode)
    losses = _losses(runs["full"].ref)
    assert losses[-1] < losses[0] - 0.2 and losses[0] == pytest.approx(math.log(TINY_VOCAB), abs=0.2)


@pytest.mark.slow
def test_zero3_on_a_cpu_with_16bit_instructions_stays_fp32_and_resumes_bitwise(new_run, zero_runs) -> None:
    """On a CPU whose DeepSpeed accelerator reports bf16 and fp16 support (AMD EPYC with avx512_bf16,
    Xeons with AMX; simulated here by spec.json's debug.simulate_16bit_cpu), ZeRO-3 keeps every weight
    fp32: the run is this CPU's bitwise, and a resumed run the uninterrupted one."""
    simulated = DebugSpec(simulate_16bit_cpu=True)
    pair = _pairs(new_run, "zero3-16bit-cpu", ["full"], strategy="ds-zero3", debug=simulated)["full"]
    first = _train((pair.ref, None), (pair.int, STOP))
    _train((pair.int, None))
    assert "simulated CPU: DeepSpeed's CPU accelerator reports bf16 and fp16 support" in first.stdout
    _assert_resumed_exactly(pair, "full")
    final = _final(pair.int, "full")
    assert {t.dtype for t in final.values()} == {torch.float32}
    here = zero_runs("ds-zero3")["full"].ref
    assert _losses(pair.ref) == _losses(here)
    assert_same_tensors(final, _final(here, "full"))


def test_a_16bit_parameter_in_a_cpu_run_fails_loudly() -> None:
    from llamajobs.worker.zero import check_fp32

    model = torch.nn.Linear(2, 2)
    check_fp32(model, "built")
    model.bias.data = model.bias.data.bfloat16()
    with pytest.raises(RuntimeError, match=r"bias is torch.bfloat16 after the model was built; a CPU run must be float32"):
        check_fp32(model, "built")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ZERO)
def test_zero_checkpoints_are_the_engines_under_our_latest(zero_runs, strategy: str) -> None:
    runs = zero_runs(strategy)
    ckpt = runs["full"].int / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-4", "step-6"]
    assert (ckpt / "latest").read_text() == "step-6\n"
    assert [p for p in ckpt.rglob("latest") if p.parent != ckpt] == []  # DeepSpeed wrote no `latest` of its own
    step = ckpt / "step-6"
    expected = {"engine", "meta.json", "train_state.json", "rng-rank0.pt", "rng-rank1.pt"}
    assert expected <= {p.name for p in step.iterdir()}
    assert json.loads((step / "meta.json").read_text())["strategy"] == strategy
    # LoRA: the engine saved the adapters only (the base is rebuilt from the seed at start-up).
    lora_step = runs["lora"].int / "checkpoints" / "step-6" / "engine"
    module = torch.load(sorted(lora_step.glob("*model_states.pt"))[0], weights_only=False)["module"]
    assert len(module) == 8 and all("lora_" in k for k in module)  # 2 layers x (q, v) x (A, B)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ZERO)
def test_zero_full_export_is_the_whole_trained_model_without_placeholders(zero_runs, strategy: str) -> None:
    """final/ equals the fp32 weights DeepSpeed's own zero_to_fp32 recovers from the last checkpoint
    (the same step): every tensor whole, ZeRO-3's partitions gathered in the right order."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = zero_runs(strategy)["full"].ref
    exported = _final(run_dir, "full")
    recovered = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints" / "step-6"),
                                                         tag=zero.ENGINE_TAG)
    expected_shapes = {k: v.shape for k, v in _random_base().state_dict().items()}
    assert {k: v.shape for k, v in exported.items()} == expected_shapes
    assert_same_tensors(exported, {k: v.contiguous() for k, v in recovered.items()})
    model = LlamaForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = load_tokenizer(run_dir / "final")
    out = model.generate(**tokenizer("Background:", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ZERO)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_zero_lora_export_is_an_adapter_peft_loads(zero_runs, strategy: str) -> None:
    from peft import PeftModel

    final = zero_runs(strategy)["lora"].ref / "final"
    saved = load_file(final / "adapter_model.safetensors")
    assert len(saved) == 8 and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    model = PeftModel.from_pretrained(_random_base(), final)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


@pytest.mark.slow
def test_fsdp_zero2_and_zero3_give_the_same_loss_curve(fsdp_runs, zero_runs, pp_runs) -> None:
    """Same data, seed and schedule: the per-step losses and gradient norms agree within
    CROSS_STRATEGY_RTOL, under full fine-tuning and LoRA (its dropout masks too: the ranks' random
    streams are the same whatever builds the model). The offload strategies as well, and pp's one
    process under full fine-tuning (LoRA's dropout masks depend on the number of ranks)."""
    worst: dict[str, float] = {}
    for mode in ("full", "lora"):
        reference = metrics_rows(fsdp_runs[mode].ref)
        for strategy, runs in [*((s, zero_runs(s)) for s in ZERO), *([("pp", pp_runs)] if mode == "full" else [])]:
            rows = metrics_rows(runs[mode].ref)
            for key in ("loss", "grad_norm"):
                ours, theirs = [r[key] for r in rows], [r[key] for r in reference]
                assert ours == pytest.approx(theirs, rel=CROSS_STRATEGY_RTOL), (strategy, mode, key)
                name = f"{strategy} {mode} {key}"
                worst[name] = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    print("largest relative difference from fsdp:", json.dumps(worst, indent=1))


# --- pp ---


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_pp_trains_resumes_and_exports(pp_runs) -> None:
    from peft import PeftModel

    _assert_resumed_exactly(pp_runs["full"], "full")
    ckpt = pp_runs["full"].ref / "checkpoints" / "step-6"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 1 and (ckpt / ".metadata").is_file()
    model = LlamaForCausalLM.from_pretrained(pp_runs["full"].ref / "final")
    assert model.state_dict().keys() == _random_base().state_dict().keys()
    adapter = PeftModel.from_pretrained(_random_base(), pp_runs["lora"].ref / "final")
    assert any(v.abs().sum() > 0 for k, v in adapter.state_dict().items() if "lora_B" in k)


# --- prefix, p-tuning, prompt tuning ---


@pytest.mark.slow
@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_prompt_learning_trains_resumes_exactly(fsdp_runs, mode: str) -> None:
    _assert_resumed_exactly(fsdp_runs[mode], mode)
    saved = dcp_trainable(fsdp_runs[mode].ref / "checkpoints" / "step-6")
    assert saved and all(k.startswith("prompt_encoder.") for k in saved)  # the base is not in the checkpoint


def dcp_trainable(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint, read on this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.pt"
    if not out.exists():
        dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", PROMPT_MODES)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
@pytest.mark.filterwarnings("ignore:Both `past_key_values` and `cache` are set:FutureWarning")  # peft + generate
@pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")  # peft + generate
def test_prompt_learning_exports_the_trained_virtual_tokens(fsdp_runs, mode: str) -> None:
    """final/ holds what peft computes from the trained encoder of the last checkpoint (the same
    step), on a model built here the ordinary way; it loads onto a fresh base and generates."""
    from peft import PeftModel, get_peft_model

    run_dir = fsdp_runs[mode].ref
    spec = JobSpec.load(run_dir / "spec.json")
    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_config["num_virtual_tokens"] == 4
    assert adapter_config["peft_type"] == {"prefix": "PREFIX_TUNING", "ptuning": "P_TUNING",
                                           "prompt": "PROMPT_TUNING"}[mode]
    exported = load_file(run_dir / "final" / "adapter_model.safetensors")["prompt_embeddings"]
    rebuilt = get_peft_model(_random_base(), model_lib.peft_config(spec))
    trained = dcp_trainable(run_dir / "checkpoints" / "step-6")
    result = rebuilt.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys
    expected = rebuilt.get_prompt_embedding_to_save("default")
    assert torch.equal(exported, expected)
    with torch.random.fork_rng(devices=[]):  # (the worker seeds the adapter's init with --seed too)
        torch.manual_seed(0)
        untrained = get_peft_model(_random_base(), model_lib.peft_config(spec))
    assert not torch.equal(exported, untrained.get_prompt_embedding_to_save("default"))  # it trained
    model = PeftModel.from_pretrained(_random_base(), run_dir / "final")
    tokenizer = load_tokenizer(run_dir / "final")
    out = model.generate(**tokenizer("Methods:", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


# --- DeepSpeed's launcher, through the rendered launch.sh ---


@pytest.mark.slow
def test_the_deepspeed_launcher_branch_of_launch_sh_trains(new_run, tmp_path: Path) -> None:
    """launch.sh with --launcher deepspeed: deepspeed.launcher.runner --no_ssh starts the worker with
    --local_rank=N and without LOCAL_WORLD_SIZE; ds_config.json is rendered into the run dir."""
    run_dir = new_run("ds-launcher")
    spec = JobSpec(**{**BASE, "strategy": "ds-zero2", "launcher": "deepspeed", "device": "cpu", "max_steps": 2})
    render.render(spec, Site(), run_dir)
    assert (run_dir / render.DS_CONFIG).is_file()
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                   **extensions_env(), "PYTHONPATH": python_path, "LLAMAJOBS_PORT": str(29400 + os.getpid() % 500)}
    result = subprocess.run(["bash", str(run_dir / "launch.sh")], cwd=run_dir, env=environment, capture_output=True,
                            text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert_exit_0(result)
    assert "--local_rank=1" in result.stdout + result.stderr
    assert [r["step"] for r in metrics_rows(run_dir)] == [1, 2] and (run_dir / "final" / "model.safetensors").is_file()
    assert "over 2 processes" in result.stdout + result.stderr


# --- the accumulated ZeRO gradient is the global batch's mean token loss gradient ---


def zero_gradient_check(strategy_name: str, mode: str) -> dict:
    """In a 2-rank group: the worker's ZeRO model, engine and forward_backward over a fixed global
    batch of 8 rows with uneven padding (micro-batches of 2, accumulated), stepped once by SGD with
    lr 1 and no clipping, so the update is minus the gradient DeepSpeed applied; against one
    unsharded forward/backward of the mean token loss over all 8 rows, and against FSDP's."""
    from llamajobs.worker.train import forward_backward

    rank, world_size = dist.get_rank(), dist.get_world_size()
    env = Dist(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
               device=torch.device("cpu"))
    spec = JobSpec(**{**BASE, "strategy": strategy_name, "mode": mode, "lora_dropout": 0.0, "seq_len": 16,
                      "grad_clip": 0.0})
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, TINY_VOCAB, (8, 16), generator=generator)
    labels = torch.randint(3, TINY_VOCAB, (8, 16), generator=generator)
    for row in range(8):  # row r has 16 - 2r real labels: ranks and micro-batches hold unequal counts
        labels[row, 16 - 2 * row:] = IGNORE_INDEX
    mine = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    micro_batches = list(zip(inputs[mine].split(2), labels[mine].split(2)))
    config = model_lib.model_config(spec)

    grads = {}
    for name in (strategy_name, "fsdp"):
        strategy = build_strategy(dataclasses.replace(spec, strategy=name), env)
        model = strategy.build_model(config, load_weights=True, chosen=kernels.choose(spec, env.device.type))
        if mode == "lora":  # lora_B starts at 0, which would leave lora_A's gradient 0: make it checkable
            _fill_lora_b(model, zero3=name == "ds-zero3")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model, optimizer = strategy.wrap(model, optimizer)
        model.train()
        before = strategy.gather(model, trainable_only=False)
        share = forward_backward(model, micro_batches, world_size, strategy)
        dist.all_reduce(share)
        strategy.step(model, optimizer, [p for p in model.parameters() if p.requires_grad], math.inf)
        after = strategy.gather(model, trainable_only=True)
        grads[name] = {n: before[n] - after[n] for n in after} if rank == 0 else {}  # (full tensors: rank 0's)
        weights = before
        del model, optimizer
        gc.collect()
    if rank != 0:
        return {}
    reference = model_lib.build_meta_model(spec, config, torch.float32, kernels.choose(spec, "cpu"))
    model_lib.materialize(reference, torch.device("cpu"), torch.device("cpu"))
    reference.load_state_dict(weights, strict=True)
    reference.train()
    logits = reference(input_ids=inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours, fsdp = grads[strategy_name], grads["fsdp"]
    assert ours.keys() == expected.keys() == fsdp.keys()
    return {
        "loss": share.item(), "reference_loss": loss.item(),
        "max_abs_error": max((ours[n] - expected[n]).abs().max().item() for n in ours),
        "max_abs_error_vs_fsdp": max((ours[n] - fsdp[n]).abs().max().item() for n in ours),
        "max_abs_grad": max(g.abs().max().item() for g in expected.values()),
        "allclose": all(torch.allclose(ours[n], expected[n], rtol=1e-4, atol=1e-6) for n in ours),
    }


def _fill_lora_b(model: torch.nn.Module, *, zero3: bool) -> None:
    for name, p in model.named_parameters():
        if "lora_B" in name:
            if zero3:  # gathered whole, written, partitioned again
                import deepspeed
                context = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
            else:
                context = contextlib.nullcontext()
            with context, torch.no_grad():
                p.fill_(0.01)  # (FSDP: this rank's shard; DTensor fill_ is local)


@pytest.mark.slow
def test_zero_gradients_equal_the_global_batch_mean_loss_gradient_and_fsdps(tmp_path: Path) -> None:
    out = tmp_path / "gradients.json"
    assert_exit_0(_torchrun(str(Path(__file__)), "gradient-check", str(out)))
    results = json.loads(out.read_text())
    assert set(results) == {f"{s} {m}" for s in ("ds-zero2", "ds-zero3") for m in ("full", "lora")}
    for name, result in results.items():
        assert result["allclose"], (name, result)
        assert result["max_abs_error_vs_fsdp"] < 1e-6, (name, result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-5), (name, result)


if __name__ == "__main__":
    # `torchrun --nproc-per-node N tests/test_deepspeed.py train RUN_DIR@[FAULT] ...`: each run dir
    # trained in turn in this process group, as `python -m llamajobs.worker RUN_DIR` would.
    # `torchrun --nproc-per-node 2 tests/test_deepspeed.py gradient-check OUT.json`
    from llamajobs.worker.train import train

    if sys.argv[1] == "train":
        runs = [(Path(item.rpartition("@")[0]), item.rpartition("@")[2]) for item in sys.argv[2:]]
        env = parallel.init_distributed(JobSpec.load(runs[0][0] / "spec.json"))
        try:
            for run_dir, fault in runs:
                spec = JobSpec.load(run_dir / "spec.json")
                debug = DebugSpec(**debug_section(fault or None, simulate_16bit_cpu=spec.debug.simulate_16bit_cpu))
                train(run_dir.resolve(), dataclasses.replace(spec, debug=debug), env)
                gc.collect()
        finally:
            parallel.teardown()
    else:
        assert sys.argv[1] == "gradient-check"
        dist.init_process_group("gloo")
        try:
            results = {f"{s} {m}": zero_gradient_check(s, m)
                       for s in ("ds-zero2", "ds-zero3") for m in ("full", "lora")}
            if dist.get_rank() == 0:
                Path(sys.argv[2]).write_text(json.dumps(results))
        finally:
            parallel.teardown()
