"""Direct preference optimisation (DPO): the loss, the reference and the step's statistics.

Preference tuning is an objective, not a new worker: the loop, strategies, checkpoints and the stop
protocol are SFT's; what differs is the batch (pairs: data/preference.py), the loss below and the
reference model. The numbers are TRL's DPOTrainer's (trl/trainer/dpo_trainer.py), which tests/test_dpo.py
checks in fp32:

    logratio(answer) = log p_policy(answer | prompt) - log p_reference(answer | prompt)
    h = logratio(chosen) - logratio(rejected)
    sigmoid:  -log sigmoid(beta * h)                 (Rafailov et al. 2023)
    ipo:      (h' - 1 / (2 * beta))^2                (Azar et al. 2023), h' from log-ratios divided by
                                                      each answer's number of tokens (TRL's choice)
    rewards   beta * logratio(answer), chosen and rejected; reward accuracy: chosen's > rejected's

log p(answer | prompt) is the sum over the answer's tokens (the labels the sampler set) of the
token log-probabilities. The reference of a LoRA run is the same model with its adapters disabled
(peft's disable_adapter(): the frozen base, no second copy), run without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamajobs.catalog import DPO_LOSSES as LOSSES
from llamajobs.data.sampler import IGNORE_INDEX, MicroBatch

# The step's statistics, summed over the global batch's pairs (then divided by their number): what
# forward_backward returns, in this order; the loss first, as the SFT step's.
STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum of each row's label log-probabilities, its number of labels), in fp32. Labels are
    aligned with the logits (the sampler shifted them); -100 is no label."""
    labels = labels.to(logits.device)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view(labels.shape)
    return token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, *, beta: float,
               loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, chosen reward, rejected reward), from the summed answer log-probabilities of
    the policy and the reference and the answers' token counts, each [2 * pairs]: the chosen answers,
    then the rejected ones. The rewards are beta x the summed log-ratios for both losses (as TRL logs
    them); only IPO's loss averages the log-ratios over each answer's tokens."""
    logratios = policy - reference
    if loss == "ipo":  # TRL: "normalize by the number of completion tokens", confirmed with IPO's authors
        chosen, rejected = (logratios / n_tokens.clamp(min=1)).chunk(2)
        losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    elif loss == "sigmoid":
        chosen, rejected = logratios.chunk(2)
        losses = -F.logsigmoid(beta * (chosen - rejected))
    else:
        raise ValueError(f"--loss {loss!r}: choose {' or '.join(LOSSES)}")
    chosen_rewards, rejected_rewards = (beta * logratios.detach()).chunk(2)
    return losses, chosen_rewards, rejected_rewards


@dataclass(frozen=True, slots=True)
class Dpo:
    """The DPO objective of a run: its forward_backward replaces SFT's in the loop's train_step.

    The reference is `reference_model` when there is one (a frozen copy of the initial model), else
    the policy itself under `disabled_adapters` (LoRA: the base)."""
    beta: float
    loss: str
    disabled_adapters: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    reference_model: nn.Module | None = None

    def reference_logps(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                        strategy) -> torch.Tensor:
        with torch.no_grad(), strategy.autocast():
            if self.reference_model is not None:
                return sequence_logps(self.reference_model(input_ids=inputs).logits, labels)[0]
            assert self.disabled_adapters is not None
            with self.disabled_adapters(model):
                return sequence_logps(model(input_ids=inputs).logits, labels)[0]

    def forward_backward(self, model: nn.Module, micro_batches: list[MicroBatch], world_size: int,
                         strategy) -> torch.Tensor:
        """Accumulate into .grad the gradient of the mean pair loss over the global batch; return this
        rank's share of the step's statistics (STATS; the sum of the shares over ranks is the mean).

        Every pair weighs the same: each micro-batch's summed pair loss is divided by the number of
        pairs in the global batch (all ranks: every rank holds as many), and world_size undoes the
        engines' mean over ranks, as SFT's token mean does (train.forward_backward)."""
        n_pairs = sum(inputs.shape[0] for inputs, _ in micro_batches) * world_size
        scale = world_size / n_pairs
        share = None
        for i, (inputs, labels) in enumerate(micro_batches):
            # [micro, 2, seq] -> [2 * micro, seq]: the chosen answers, then the rejected ones
            inputs, labels = inputs.transpose(0, 1).flatten(0, 1), labels.transpose(0, 1).flatten(0, 1)
            reference = self.reference_logps(model, inputs, labels, strategy)
            strategy.set_gradient_sync(model, i == len(micro_batches) - 1)
            with strategy.autocast():
                policy, n_tokens = sequence_logps(model(input_ids=inputs).logits, labels)
            losses, chosen_rewards, rejected_rewards = dpo_losses(policy, reference.to(policy.device),
                                                                  n_tokens, beta=self.beta, loss=self.loss)
            strategy.backward(model, losses.sum() * scale)
            chosen, rejected = policy.detach().chunk(2)
            stats = torch.stack([losses.detach().sum(), (chosen_rewards > rejected_rewards).float().sum(),
                                 (chosen_rewards - rejected_rewards).sum(), chosen.sum(), rejected.sum()])
            share = stats if share is None else share + stats
        assert share is not None
        return share / n_pairs


def build(spec, strategy, config, chosen) -> Dpo:
    """The run's DPO objective. LoRA's reference is the peft model (under the engine's wrapper) with its
    adapters off. A full fine-tune's is a second model built as the policy was at step 0 (its starting
    weights read again, also on a resume: the reference never moves) and sharded the same way by the
    strategy, frozen. (rules.py allows full with the fsdp strategies only: a ZeRO-3 copy would need an
    engine of its own.)"""
    if spec.mode_info.adapters:
        return Dpo(beta=spec.beta, loss=spec.loss,
                   disabled_adapters=lambda model: strategy.unwrap(model).disable_adapter())
    reference = strategy.build_model(config, load_weights=True, chosen=chosen)  # the policy's kernels
    reference.requires_grad_(False).eval()
    return Dpo(beta=spec.beta, loss=spec.loss, reference_model=reference)
