"""FSDP2 accumulation both ways gives the same training: the unsharded fp32 accumulator (reduce-scatter
after the last micro-batch) and sharded accumulation (reduce-scatter every micro-batch into the
shard). Two gloo ranks on this CPU, the worker's own FSDP wrapping, forward_backward and step, a tiny
LLaMA; one spawn runs both ways and CPU AdamW fused (what fsdp-offload now runs on the host)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs.spec import JobSpec
from llamajobs.worker import parallel
from llamajobs.worker.parallel import Dist
from llamajobs.worker.train import forward_backward

STEPS, MICRO_BATCHES, SEQ = 3, 4, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(spec: JobSpec, env: Dist) -> tuple[torch.nn.Module, parallel.Fsdp]:
    torch.manual_seed(0)  # the same weights on both ranks and both ways
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    parallel.parallelize(model, spec, env.device)
    return model, parallel.Fsdp(spec, env)


def _sharded_gradient_after_a_first_micro_batch(spec: JobSpec, env: Dist) -> bool:
    """Whether the first micro-batch (not the last: no sync asked) already reduce-scattered into the
    sharded gradients: what tells the two ways apart."""
    model, strategy = _model(spec, env)
    strategy.set_gradient_sync(model, False)
    x = torch.randint(0, 64, (2, SEQ))
    model(input_ids=x).logits.sum().backward()
    return all(p.grad is not None for p in model.parameters())


def _train(spec: JobSpec, env: Dist, fused: bool) -> list[float]:
    model, strategy = _model(spec, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(STEPS):
        data = torch.Generator().manual_seed(1 + env.rank)  # each rank its own batches, again each step
        batches = [(x[:, :-1], x[:, 1:]) for x in
                   (torch.randint(0, 64, (2, SEQ + 1), generator=data) for _ in range(MICRO_BATCHES))]
        loss = forward_backward(model, batches, env.world_size, strategy)
        strategy.step(model, optimizer, params, max_norm=1.0)
        dist.all_reduce(loss)
        losses.append(loss.item())
    return losses


def _rank(rank: int, world_size: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        env = Dist(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   device=torch.device("cpu"))
        spec = JobSpec(cluster="local", device="cpu", global_batch=2 * MICRO_BATCHES * world_size, micro_batch=2)
        sharded = dataclasses.replace(spec, sharded_accumulation=True)
        result = {
            "reduced early": (_sharded_gradient_after_a_first_micro_batch(spec, env),
                              _sharded_gradient_after_a_first_micro_batch(sharded, env)),
            "unsharded": _train(spec, env, fused=False),
            "sharded": _train(dataclasses.replace(spec, sharded_accumulation=True), env, fused=False),
            "sharded, fused AdamW": _train(dataclasses.replace(spec, sharded_accumulation=True), env, fused=True),
        }
        if rank == 0:
            out.update(result)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def losses() -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_sharded_accumulation_reduce_scatters_every_micro_batch(losses):
    assert losses["reduced early"] == (False, True)


def test_sharded_accumulation_trains_like_the_unsharded_accumulator(losses):
    assert len(losses["unsharded"]) == STEPS and losses["unsharded"][-1] < losses["unsharded"][0]
    assert losses["sharded"] == pytest.approx(losses["unsharded"], rel=1e-5)


def test_fused_cpu_adamw_steps_sharded_parameters_like_the_default(losses):
    assert losses["sharded, fused AdamW"] == pytest.approx(losses["sharded"], rel=1e-4)
