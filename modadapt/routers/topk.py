"""`topk`: the original Mixture-of-Depths router (Raposo et al., 2024).

A linear score per token; while training, each sequence keeps its top `ceil(capacity * T)` tokens
(static shape, no host sync). Top-k looks ahead, so evaluation and decoding use a causal rule on a
per-token statistic, taught by an auxiliary BCE loss towards the top-k choice: the score itself
(`causal_rule=aux`) or a small stop-gradient predictor (`causal_rule=predictor`). The paper keeps
a token when the statistic is >= 0 (`sigmoid >= 0.5`); with a capacity well under one half the BCE
learns to say "skip" almost everywhere and that rule keeps far fewer tokens than the capacity
(a small fraction of it). So by default (`causal_threshold=calibrated`) the cut-off is the
statistic's top-k boundary, averaged over training steps; a number fixes it (0 = the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, RoutingContext
from .linear_score import LinearScore
from .options import RouterOptions, option


@dataclass(frozen=True)
class TopKOptions(RouterOptions):
    aux_coef: float = option(
        0.01, "weight of the auxiliary BCE loss that teaches the causal rule the top-k choice", low=0
    )
    causal_rule: str = option(
        "aux",
        "the causal rule's statistic: the score itself (aux) or a small stop-gradient predictor",
        choices=("aux", "predictor"),
    )
    predictor_hidden: int = option(64, "hidden width of the predictor (causal_rule=predictor)", low=1)
    gate: str = option(
        "straight-through",
        "factor on a kept token's delta: exactly 1 with sigmoid's gradient "
        "(straight-through) or p-MoD's 1 + 0.2 tanh(score) (tanh; 1 at a fresh router)",
        choices=("straight-through", "tanh"),
    )
    causal_threshold: float | None = option(
        None,
        "cut-off of the causal rule; calibrated: the top-k boundary learnt while training "
        "(0 = the paper's sigmoid >= 0.5)",
        none="calibrated",
        calibrated=0.0,
    )


class TopKRouter(Router):
    """Learned linear score, top-k at capacity (original MoD); causal rule for decoding."""

    name = "topk"
    causal = False
    capacity_based = True
    Options = TopKOptions

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__(hidden_size, capacity, layer_index, **kwargs)
        self.aux_coef = self.options.aux_coef
        self.scorer = LinearScore(hidden_size)
        if self.options.causal_rule == "predictor":
            width = self.options.predictor_hidden
            self.predictor = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, 1))
            nn.init.zeros_(self.predictor[2].weight)
            nn.init.zeros_(self.predictor[2].bias)
        else:
            self.predictor = None

    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return self.scorer(hidden)

    def gate(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.options.gate == "tanh":  # bounded in [0.8, 1.2], applied in evaluation and decoding too
            return 1.0 + 0.2 * torch.tanh(logits)
        return super().gate(logits)

    def rule_statistic(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.predictor is None:
            return logits
        return self.predictor(hidden.detach().to(self.predictor[0].weight.dtype)).squeeze(-1).float()

    def causal_keep(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return self.rule_statistic(logits, hidden) >= self.causal_threshold(ctx.layer_index)

    def aux_loss(self, logits, keep, hidden, ctx):
        if self.aux_coef == 0 or ctx.causal:
            return None
        rule_logits = self.rule_statistic(logits, hidden)
        target = keep.to(rule_logits.dtype)
        loss = F.binary_cross_entropy_with_logits(rule_logits, target, reduction="none")
        if ctx.real is not None:
            real = ctx.real.to(loss.dtype)
            return self.aux_coef * (loss * real).sum() / real.sum().clamp_min(1)
        return self.aux_coef * loss.mean()
