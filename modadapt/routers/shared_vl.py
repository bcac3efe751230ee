"""`shared-vl`: γ-MoD's shared vision-language router (Luo et al., arXiv 2410.13859).

One `Linear(d, 2)` router (skip / process) is shared by every MoD layer of the model and by image
and text tokens (``per_layer=true`` gives each layer its own). The score of a token is the logit
difference process − skip, so ``sigmoid(score)`` is the softmax probability of "process". While
training each sequence keeps its top ``ceil(capacity · n)`` tokens, where n counts the tokens that
are neither padding nor forced: masked routing, in which protected (question) tokens are always
processed and do not count against the capacity, is the framework's `forced` role (the LLaVA
adapter's ``protect`` option). An auxiliary cross-entropy (coefficient ``aux_coef``) teaches the
probability the top-k choice over the routed tokens; the causal rule (evaluation, decoding) keeps
a token iff its score clears a cut-off: γ-MoD's ``p_process >= 0.5`` (``causal_threshold=0``)
keeps far fewer tokens than the capacity once the cross-entropy has learnt that most tokens are
skipped (91-96 % of image tokens skipped at capacity 0.3 in `benchmarks/llava_digits.py`), so by
default the cut-off is calibrated to the top-k boundary seen while training (see
`Router.causal_threshold`). The router starts at zero, so p = 0.5 everywhere: a fresh
conversion keeps every token in eval mode, and the straight-through gate is exactly 1, so it
reproduces the dense model.
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
class SharedVLOptions(RouterOptions):
    aux_coef: float = option(0.01, "weight of the auxiliary cross-entropy toward the top-k choice", low=0)
    per_layer: bool = option(False, "give every MoD layer its own router instead of one shared by all")
    causal_threshold: float | None = option(
        None,
        "cut-off of the causal rule on the process - skip logit; calibrated: the top-k boundary learnt "
        "while training (0 = the paper's p_process >= 0.5)",
        none="calibrated",
        calibrated=0.0,
    )


class SharedVLRouter(Router):
    """One skip/process classifier shared by all MoD layers; top-k while training, a calibrated cut-off causally."""

    name = "shared-vl"
    causal = False
    capacity_based = True
    Options = SharedVLOptions

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__(hidden_size, capacity, layer_index, **kwargs)
        self.aux_coef = self.options.aux_coef
        self.classifier = LinearScore(hidden_size, outputs=2)  # [skip, process] logits

    @classmethod
    def prepare_model(cls, model: nn.Module, adapter, layer_indices: list[int], routers: dict) -> list:
        """Share the first layer's router with every MoD layer (unless ``per_layer``): the same
        module instance becomes each layer's `router`, so there is one set of parameters."""
        first = routers[layer_indices[0]]
        if not first.options.per_layer:
            for i in layer_indices:
                routers[i] = first
            first.calibrate_layers(layer_indices)  # one parameter set, one causal cut-off per layer
        return []

    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        logits = self.classifier(hidden)
        return logits[..., 1] - logits[..., 0]

    def causal_keep(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return logits >= self.causal_threshold(ctx.layer_index)

    def aux_loss(self, logits, keep, hidden, ctx):
        if self.aux_coef == 0 or ctx.causal:
            return None
        # Two-class cross-entropy on (skip, process) == BCE on their logit difference.
        loss = F.binary_cross_entropy_with_logits(logits, keep.to(logits.dtype), reduction="none")
        weight = ctx.routed().to(loss.dtype)
        return self.aux_coef * (loss * weight).sum() / weight.sum().clamp_min(1)
