"""`threshold-p`: MoDification's router (Zhang et al., 2024, arXiv 2410.14268).

Gate `g = sigmoid(w . x + b)`; a token is processed iff `g >= p`. The decision for token i uses
only token i, so it is causal by construction and the count varies per sequence. The layer
load-reducing loss `alpha * F_j * G_j` (F_j: kept fraction, no gradient; G_j: mean gate, with
gradient) is summed over layers by the framework. A fresh conversion (zero weights, bias at
logit(p), so g = p) keeps every token with a gate of exactly 1, so it equals the dense model.

`target` (our addition): the loss becomes `alpha * (F_j - target) * G_j`, which lowers the gates
while a layer keeps more than `target` and raises them while it keeps less. Without it a converted
*pretrained* model collapses: the marginal value of a kept token's gate is ~0 at a trained optimum,
so the load loss wins, every gate falls below p, and then no gradient reaches a token again (the
straight-through gate has none on skipped tokens and `F_j = 0` zeroes the load loss), at any
alpha. `target=none` is MoDification's loss as published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Router, RoutingContext, over_processes, process_sum, straight_through_one
from .linear_score import LinearScore
from .options import RouterOptions, option


@dataclass(frozen=True)
class ThresholdOptions(RouterOptions):
    p: float = option(0.5, "keep a token iff sigmoid(w.x + b) >= p", low=0, high=1, open_interval=True)
    alpha: float = option(0.01, "weight of the layer load-reducing loss", low=0)
    gate: str = option(
        "straight-through",
        "factor on a kept token's delta: exactly 1 with sigmoid's gradient (straight-through) or the sigmoid itself",
        choices=("straight-through", "sigmoid"),
    )
    target: float | None = option(
        0.5,
        "kept fraction the load loss steers each layer to; none: "
        "MoDification's loss as published (collapses on pretrained models)",
        low=0,
        high=1,
    )


class ThresholdRouter(Router):
    """MoDification: keep a token iff sigmoid(w.x+b) >= p, with a layer load-reducing loss."""

    name = "threshold-p"
    causal = True
    capacity_based = False
    Options = ThresholdOptions

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__(hidden_size, capacity, layer_index, **kwargs)
        self.p, self.alpha, self.target = self.options.p, self.options.alpha, self.options.target
        self.gate_mode = self.options.gate
        self.logit_p = math.log(self.p / (1.0 - self.p))
        self._rounded_logit_p: dict = {}
        self.scorer = LinearScore(hidden_size)
        with torch.no_grad():
            self.scorer.bias.fill_(self.logit_p)

    @property
    def target_share(self) -> float | None:
        return self.target

    @target_share.setter
    def target_share(self, share: float) -> None:
        self.target = share

    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return self.scorer(hidden)

    def causal_keep(self, logits, hidden, ctx):
        # Compare against logit(p) rounded like the bias, so a fresh router in bf16 still keeps all.
        dtype = self.scorer.bias.dtype
        if torch.compiler.is_compiling():  # a constant of the graph (the cache below is the host's)
            return logits >= torch.full((), self.logit_p, dtype=dtype, device=logits.device).to(logits.dtype)
        threshold = self._rounded_logit_p.get(dtype)
        if threshold is None:  # once per dtype: no tensor is built per decode step
            threshold = self._rounded_logit_p[dtype] = torch.tensor(self.logit_p, dtype=dtype).item()
        return logits >= threshold

    def gate(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.gate_mode == "sigmoid":
            return torch.sigmoid(logits)
        return straight_through_one(torch.sigmoid(logits)) if logits.requires_grad else None

    def aux_loss(self, logits, keep, hidden, ctx):
        if self.alpha == 0:
            return None
        g = torch.sigmoid(logits)
        if ctx.real is None:
            kept_fraction, mean_gate = keep.float().mean(), g.mean()
        else:
            real = ctx.real.to(g.dtype)
            n = real.sum().clamp_min(1)
            kept_fraction, mean_gate = (keep.to(g.dtype) * real).sum() / n, (g * real).sum() / n
        if over_processes():  # a data-parallel step: the kept fraction of the processes' whole batch
            real = torch.ones_like(keep, dtype=torch.float) if ctx.real is None else ctx.real.float()
            summed = process_sum(torch.stack([(keep.float() * real).sum(), real.sum()]))
            kept_fraction = (summed[0] / summed[1].clamp_min(1)).to(kept_fraction.dtype)
        load = kept_fraction.detach() if self.target is None else kept_fraction.detach() - self.target
        return self.alpha * load * mean_gate
