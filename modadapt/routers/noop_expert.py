"""`noop-expert`: integrated MoDE (Raposo et al., 2024, arXiv 2404.02258, "Mixture-of-Depths"): a
no-op expert in a mixture of experts' router.

The experts' router (top-k of E experts per token) gets one more logit, the no-op expert's,
`s = w . x + b + threshold` (a new trainable row, zero at conversion, plus a cut-off). It takes
each of a token's top-k slots whose expert's logit is below `s`: that slot adds nothing (the
residual carries the token) and costs nothing in the FLOPs model; the other slots keep the weights
the family gives them (no renormalisation, so a token that keeps all its slots is unchanged). A
token whose every slot goes to the no-op expert skips the MLP outright: the MoD layer (scope
'mlp', the only one this router routes) does not gather it, so the experts, their router, its
load-balancing loss and the expert counts never see it (a shared expert, Qwen2-MoE's, included).

How many: with `threshold=calibrated` (the default) the capacity, as a share of the real tokens'
expert slots. While training the cut-off is the batch's: its slots are ranked by margin
`l - (w . x + b)` and the top `ceil(capacity * slots)` run, as `topk` ranks tokens; the cut-offs
are averaged over training steps (`calibrated_threshold`, as every calibrated router does) and
evaluation and decoding use the average, a per-token rule, so decoding with a cache equals a full
forward. Before any training step the cut-off is -inf: no slot goes to the no-op expert and the
converted model is exactly the original. A number fixes the cut-off (a threshold router, steered
by the load loss; a fresh no-op logit is 0, so `threshold=0` at once drops every slot whose
expert's logit is below 0).

Gradients: a slot that runs is weighted by a straight-through 1 with the gradient of
`sigmoid(margin - threshold)` (the experts' logits detached: their router learns as it did), so
the LM loss teaches the no-op row which slots matter. The load loss `alpha * (F - (1 - capacity))
* G` (F: the share of the real tokens' slots that the causal rule gives the no-op expert on this
batch, no gradient; G: their mean no-op probability `sigmoid(threshold - margin)`) pulls the share
of evaluation and decoding toward the target (with a calibrated cut-off it corrects the average's
lag). It is this router's auxiliary loss (`outputs.router_aux_loss`), apart from the experts'
load-balancing loss (`outputs.aux_loss`); both are in `outputs.loss`.

No-op slots reach transformers' expert kernels with weight 0 (no kernel of every supported
transformers version skips a slot), so they still run there; tokens with no slot left do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModAdaptError
from .base import (
    Router,
    RoutingContext,
    RoutingDecision,
    over_processes,
    process_sum,
    straight_through_one,
    topk_boundary,
)
from .linear_score import LinearScore
from .options import RouterOptions, option


@dataclass(frozen=True)
class NoopExpertOptions(RouterOptions):
    alpha: float = option(
        0.01, "weight of the load loss pulling the no-op expert's share of the slots toward 1 - capacity", low=0
    )
    threshold: float | None = option(
        None,
        "cut-off added to the no-op expert's logit; calibrated: set by the capacity (the batch's while "
        "training, their average in eval and decoding; -inf before any step: nothing dropped)",
        none="calibrated",
        calibrated=float("-inf"),
    )


class GateOutput(tuple):
    """An experts' router's `(logits, weights, indices)`, with `dropped_slots` (`[N, k]` bool):
    the slots that went to the no-op expert (weight 0), which the expert statistics count apart."""

    def __new__(cls, values: tuple, dropped: torch.Tensor):
        out = super().__new__(cls, values)
        out.dropped_slots = dropped
        return out


class NoopGated:
    """Mixin placed before the class of an experts' router (class swap, as for MoD layers): while
    its MoD layer runs the MLP on the tokens it kept, the slots below the no-op expert's logit get
    weight 0 (see the module docstring); otherwise it is the original router."""

    def forward(self, hidden_states: torch.Tensor):
        logits, weights, indices = self._mod_original.forward(self, hidden_states)
        unit = self.__dict__["noop_unit"]  # the routed MLP; its router holds the no-op row
        state, router = getattr(unit, "mod_state", None), getattr(unit, "router", None)
        if state is None or not state.on_subset or router.slot_cut is None:
            return logits, weights, indices
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        margin = logits.gather(1, indices).detach().float() - router.scorer(rows)[:, None]
        runs = margin.detach() >= router.slot_cut
        gate = straight_through_one(torch.sigmoid(margin - router.slot_cut)) if torch.is_grad_enabled() else None
        if gate is not None:
            weights = weights * gate.to(weights.dtype)
        return GateOutput((logits, weights.masked_fill(~runs, 0), indices), ~runs)


_GATED: dict[type, type] = {}


class _RemoveNoopExpert:
    """Undoes `add_noop_expert` (an object, so that `copy.deepcopy(model)` binds the copy's router)."""

    def __init__(self, gate: nn.Module):
        self.gate = gate

    def remove(self) -> None:
        if isinstance(self.gate, NoopGated):
            self.gate.__class__ = self.gate._mod_original
            del self.gate.__dict__["noop_unit"]


def add_noop_expert(gate: nn.Module, unit: nn.Module) -> _RemoveNoopExpert:
    """Swap the class of the experts' router `gate` for its `NoopGated` subclass, which reads the
    no-op row and cut-off from `unit.router` (`unit`: the routed MLP around it)."""
    original = type(gate)
    if original not in _GATED:
        _GATED[original] = type(f"NoopExpert{original.__name__}", (NoopGated, original), {"_mod_original": original})
    gate.__class__ = _GATED[original]
    gate.__dict__["noop_unit"] = unit  # not a submodule: no second state-dict entry
    return _RemoveNoopExpert(gate)


class NoopExpertRouter(Router):
    """Integrated MoDE: a no-op expert in the experts' router; slots routed to it skip their expert."""

    name = "noop-expert"
    causal = False  # the training-time cut-off is the batch's
    capacity_based = True
    graphable = False  # a sublayer router (scope 'mlp'), which GraphedDecoder does not run
    scopes = ("mlp",)
    Options = NoopExpertOptions

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__(hidden_size, capacity, layer_index, **kwargs)
        self.alpha = self.options.alpha
        self.scorer = LinearScore(hidden_size)  # the no-op expert's logit, before the cut-off
        self.__dict__["experts_router"] = None  # set by prepare_model; its weights are the MLP's
        self.slot_cut: torch.Tensor | float | None = None  # the cut-off of the current decision
        self._margins: torch.Tensor | None = None  # [B, T, k] of the decision being made
        self._slots: torch.Tensor | None = None
        self._scored = 0  # tokens the experts' router scored in the last decision

    # --- placement ------------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, model: nn.Module, adapter) -> str | None:
        _, layers = adapter.layer_stack(model)
        if not any(_experts_router(model, adapter, layer, i) is not None for i, layer in enumerate(layers)):
            kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
            return (
                f"router 'noop-expert' adds a no-op expert to a mixture of experts' router, and this {kind!r} "
                "model has no mixture-of-experts layer; convert a mixture-of-experts model, or use another router."
            )
        return None

    @classmethod
    def prepare_model(cls, model: nn.Module, adapter, layer_indices: list[int], routers: dict) -> list:
        _, layers = adapter.layer_stack(model)
        found = []
        for i in layer_indices:
            gate = _experts_router(model, adapter, layers[i], i)
            if gate is None:
                raise ModAdaptError(
                    f"router 'noop-expert': layer {i}'s MLP is not a mixture of experts, so it has no router to add "
                    "a no-op expert to; choose mixture-of-experts layers."
                )
            _check_contract(gate, i, routers[i].hidden_size)
            found.append((i, adapter.sublayer_call(model, layers[i], i, "mlp")[0], gate))
        handles = []
        for i, unit, gate in found:  # nothing changes before every layer passed
            routers[i].__dict__["experts_router"] = gate
            handles.append(add_noop_expert(gate, unit))
        return handles

    # --- routing ------------------------------------------------------------------------------------
    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Each slot's margin over the no-op expert, `l - (w . x + b)`, kept for the decision; a
        token's score is its best slot's (it enters the MLP iff that slot runs)."""
        B, T, D = hidden.shape
        gate = self.__dict__["experts_router"]
        with torch.no_grad():  # the experts' router learns inside the MLP, not from this
            logits, _, indices = gate._mod_original.forward(gate, hidden.reshape(-1, D))
            slots = logits.gather(1, indices).float().view(B, T, -1)
        self._margins = slots - self.scorer(hidden)[..., None]
        self._scored = B * T
        return self._margins.detach().max(-1).values

    def causal_keep(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return self._decide(self.causal_threshold(ctx.layer_index), ctx)

    def select(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Training-time (or `inference_routing='topk'`) decision: with a calibrated cut-off, the
        batch's, so that `ceil(capacity * slots)` of its real tokens' slots run (recorded for the
        causal rule while training); with a fixed one, the causal rule."""
        if self.options.threshold is not None or self.capacity >= 1.0:
            return self._decide(self.causal_threshold(ctx.layer_index), ctx)
        values, eligible = self.cutoff_statistic(logits, hidden, ctx)
        cut = topk_boundary(values, self.capacity, eligible)
        if ctx.training:
            self.record_cutoff(cut, ctx.layer_index)
        return self._decide(torch.nan_to_num(cut, nan=math.inf), ctx)  # no eligible slot: none runs

    def cutoff_statistic(self, logits, hidden, ctx):
        """Each slot's margin, every slot of a routed token eligible: the capacity is a share of slots."""
        margins = self._margins.detach()
        return margins, ctx.routed()[..., None].expand_as(margins)

    def _decide(self, cut: torch.Tensor | float, ctx: RoutingContext) -> torch.Tensor:
        """Keep the tokens with a slot at or above `cut` (the cut-off the experts' router applies
        next); count each real token's running slots."""
        self.slot_cut = cut
        runs = self._margins.detach() >= cut
        slots = runs.sum(-1)
        self._slots = slots if ctx.real is None else slots.masked_fill(~ctx.real, 0)
        return runs.any(-1)

    def route(self, hidden: torch.Tensor, ctx: RoutingContext) -> RoutingDecision:
        decision = super().route(hidden, ctx)
        decision.expert_slots = torch.where(decision.keep, self._slots, 0)
        self._margins = None  # holds the graph of the no-op row: not kept past the decision
        return decision

    def gate(self, logits: torch.Tensor) -> torch.Tensor | None:
        """None: a kept token's MLP output is weighted per slot, inside the experts' router."""
        return None

    def aux_loss(self, logits, keep, hidden, ctx):
        if self.alpha == 0:
            return None
        margins, cut = self._margins, self.causal_threshold(ctx.layer_index)
        eligible = ctx.routed()[..., None].expand_as(margins).float()
        counts = torch.stack([((margins.detach() < cut).float() * eligible).sum(), eligible.sum()])
        if over_processes():  # a data-parallel step: the share over the processes' whole batch
            counts = process_sum(counts)
        share = counts[0] / counts[1].clamp_min(1)
        probability = (torch.sigmoid(cut - margins) * eligible).sum() / eligible.sum().clamp_min(1)
        return self.alpha * (share - (1.0 - self.capacity)) * probability

    def extra_flops(self, matmul_only: bool = False) -> int:
        """The experts' router's logits for every token (to rank the slots), beside its own run on
        the kept ones inside the MLP; a flop counter sees the matmul too."""
        gate = self.__dict__["experts_router"]
        if gate is None:
            return 0
        return 2 * self._scored * sum(p.numel() for p in gate.parameters(recurse=False) if p.dim() == 2)


def _experts_router(model: nn.Module, adapter, layer: nn.Module, index: int) -> nn.Module | None:
    """The experts' router of `layer`'s MLP (None: no MLP the adapter splits off, or no experts)."""
    try:
        mlp, _ = adapter.sublayer_call(model, layer, index, "mlp")
    except ModAdaptError:
        return None
    return adapter.expert_router(model, mlp)


def _check_contract(gate: nn.Module, index: int, hidden: int) -> None:
    """The experts' router must return `(logits [N, E], weights [N, k], indices [N, k])`."""
    weight = next(gate.parameters(), None)
    probe = torch.zeros(2, hidden, dtype=weight.dtype if weight is not None else None)
    with torch.no_grad():
        out = type(gate).forward(gate, probe.to(weight.device) if weight is not None else probe)
    ok = isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)
    if ok:
        logits, weights, indices = out
        ok = (
            logits.dim() == 2
            and weights.shape == indices.shape == (2, indices.shape[-1])
            and not indices.is_floating_point()
        )
    if not ok:
        raise ModAdaptError(
            f"router 'noop-expert': layer {index}'s experts' router ({type(gate).__name__}) does not return "
            "(logits, weights, indices) per token, which the no-op expert needs."
        )
