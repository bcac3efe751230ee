"""The Router contract: which tokens a MoD layer processes.

A router scores tokens; the framework (this file) turns scores into a sorted, packed selection,
applies the token roles (padding never kept, forced tokens always kept), and asks the router for
gates and auxiliary losses. A router author implements `score`, `causal_keep` and, optionally,
`gate`, `aux_loss` and `select`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .options import RouterOptions, calibrated_option, legacy_options, parse_options

_PROCESS_SUM: list = []  # the training loop's sum over its processes, while it runs several


@contextlib.contextmanager
def statistics_over_processes(process_sum):
    """Within: the batch statistics routers take without gradient (threshold-p's kept fraction
    in its load loss, a calibrated cut-off's batch boundary) are over the global batch of a
    data-parallel step, not one process's share, so N processes train as one would on their
    whole batch. `process_sum(tensor)` sums a tensor over the processes; every process must run
    the same training forwards (a recipe's loop does). Outside, statistics are per call."""
    _PROCESS_SUM.append(process_sum)
    try:
        yield
    finally:
        _PROCESS_SUM.pop()


def over_processes() -> bool:
    """Whether batch statistics are summed over processes here (`statistics_over_processes`)."""
    return bool(_PROCESS_SUM)


def process_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` (no gradient) summed over the processes within `statistics_over_processes`."""
    return _PROCESS_SUM[-1](values.detach())


@dataclass
class RoutingContext:
    """What a router may look at besides the hidden states of one MoD layer call.

    Attributes:
        layer_index: Index of the layer in its stack.
        real: `[B, T]` bool, False for padding (None: no padding).
        forced: `[B, T]` bool, tokens that must be processed (prefix/CLS, protected); None: none.
        positions: `[B, T]` long position ids of the tokens (for position-keyed routers).
        causal: True when the decision must be causal (eval with causal routing, or decoding).
        training: Whether the model is training (auxiliary losses are only computed then).
        roles: Free-form per-token role tensors from the adapter (e.g. ``{"image": [B, T]}``).
        prefix: When the only forced tokens are the first `prefix` of every row (ViT class and
            register tokens), their count; capacity selection then keeps a static shape.
        pack: The layer can run the rows' kept tokens packed into one sequence
            (`modadapt.varlen`): a keep-mask selection is then returned packed (see
            `RoutingDecision.segments`).
        pack_bucket: With `pack`, round the packed count up to a multiple of this (filler
            tokens, see `pack_rows`); None: exact.
        pack_slots: With `pack`, pack into exactly this many slots without counting the kept
            tokens on the host (`pack_reserved`; `ModConfig.pack_reserve`); None: count them.
    """

    layer_index: int
    real: torch.Tensor | None
    forced: torch.Tensor | None
    positions: torch.Tensor
    causal: bool
    training: bool
    roles: dict | None = None
    prefix: int = 0
    pack: bool = False
    pack_bucket: int | None = None
    pack_slots: int | None = None

    @property
    def fillers(self) -> bool:
        """Whether a packed selection may hold filler tokens (index `B * T`, a dummy row)."""
        return self.pack_bucket is not None or self.pack_slots is not None

    def routed(self) -> torch.Tensor:
        """`[B, T]` bool: the tokens the capacity is shared among (real, not forced, not prefix)."""
        B, T = self.positions.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=self.positions.device)
        if self.real is not None:
            mask = mask & self.real
        if self.forced is not None:
            mask = mask & ~self.forced
        if self.prefix:
            mask[:, : self.prefix] = False
        return mask


@dataclass
class RoutingDecision:
    """The tokens one MoD layer processes, packed per row.

    Attributes:
        indices: `[B, K]` token indices, sorted ascending within each row among valid slots.
        valid: `[B, K]` bool, False for filler slots of rows that keep fewer than K tokens
            (their outputs are discarded and their K/V is never attended). None: all valid.
        gate: `[B, K]` factor on the layer's delta for each slot; None means exactly 1.
        keep: `[B, T]` bool mask of kept tokens (for statistics).
        aux_loss: Scalar auxiliary loss to add to the training loss, or None.
        logits: `[B, T]` router scores (for statistics and causal-rule training).
        segments: None for the per-row layout above. Packed: `indices` is `[1, N]`, the kept
            tokens' indices into the flattened `[B * T]` tokens, row after row, and `segments`
            the `[B + 1]` int32 offsets where each row's tokens start (then `valid` is None).
            Bucketed (`RoutingContext.pack_bucket`): `[B + 2]` offsets, the last segment filler
            tokens whose index is `B * T` (one past the tokens: a dummy row the caller appends);
            reserved (`RoutingContext.pack_slots`): fillers in segments of at most T (`pack_reserved`).
        expert_slots: `[B, T]` long, for a router that also drops some of a mixture of experts'
            top-k slots (`noop-expert`): how many experts each token runs (0 where skipped), for
            the FLOPs model. None: a kept token runs all of its top-k experts.
        kept_total: Packed into reserved slots (`RoutingContext.pack_slots`): a 0-dim tensor, how
            many tokens were kept; more than the slots hold means the selection was cut short and
            the forward must run again with exact counts. None otherwise.
    """

    indices: torch.Tensor
    valid: torch.Tensor | None
    gate: torch.Tensor | None
    keep: torch.Tensor
    aux_loss: torch.Tensor | None
    logits: torch.Tensor
    segments: torch.Tensor | None = None
    expert_slots: torch.Tensor | None = None
    kept_total: torch.Tensor | None = None


def straight_through_one(x: torch.Tensor) -> torch.Tensor | None:
    """Exactly 1 in value, with the gradient of `x`: a pretrained block starts at full strength.

    None (no gate at all) when no gradient is needed: multiplying by 1 would only cost time.
    """
    if not x.requires_grad:
        return None
    return 1.0 + (x - x.detach())


class Router(nn.Module):
    """Base class for routers.

    Subclasses set `name`, `causal` (whether the training-time decision for token i depends only
    on tokens <= i), `capacity_based` (static top-k selection while training) and `Options` (their
    arguments), and implement `score` and `causal_keep`.
    """

    name: ClassVar[str] = ""
    causal: ClassVar[bool] = False
    capacity_based: ClassVar[bool] = True
    #: Whether `score` / `causal_keep` / `gate` of a one-token step can run inside a captured
    #: CUDA graph (`GraphedDecoder`): no host sync, nothing read from outside the layer's input.
    graphable: ClassVar[bool] = True
    #: The densest layer placement (a `ModConfig.layers` rule) this router accepts; the
    #: conformance kits convert with it, so that they check the router wherever it may sit.
    densest_layers: ClassVar[str] = "all-but-first"
    #: The `ModConfig.scope` values this router can route; None: every one. A router that routes
    #: one sublayer only (`noop-expert`: the MLP) gets it when the config leaves the default
    #: 'block'; any other scope is an error.
    scopes: ClassVar[tuple[str, ...] | None] = None
    #: The router's arguments (`router_kwargs`): a `RouterOptions` dataclass whose fields carry
    #: type, default, help and constraints; the parsed instance is `self.options`.
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    #: Each argument's default, derived from `Options` (read-only view for older callers).
    arguments: ClassVar[dict] = {}
    #: Derived from `Options`: the argument marked `calibrated=` and its pre-training cut-off.
    #: Capacity routers whose causal rule thresholds a per-token statistic (`rule_statistic`)
    #: mark the option that fixes the cut-off (default None: calibrated). Every training-time
    #: top-k then records the cut-off that keeps `capacity` of the batch's tokens (`topk_boundary`;
    #: a moving average in the buffer `calibrated_threshold`; `calibration_steps` counts the steps
    #: seen), so the causal rule keeps about `capacity` of the tokens instead of whatever a fixed
    #: cut-off keeps.
    causal_cutoff: ClassVar[tuple[str, float] | None] = None
    #: Weight of the newest batch in that moving average.
    calibration_momentum: ClassVar[float] = 0.25

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive `arguments` and `causal_cutoff` from `Options`; a router declared the old way
        (an `arguments` dict, `nullable`, a `causal_cutoff` tuple) gets an `Options` built from it."""
        super().__init_subclass__(**kwargs)
        if any(name in vars(cls) for name in ("arguments", "nullable", "causal_cutoff")):
            warnings.warn(
                f"router {cls.__qualname__}: declare its arguments as a RouterOptions dataclass (`Options`) "
                "instead of `arguments` / `nullable` / `causal_cutoff`; the old way goes away in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.Options = legacy_options(cls)
        if isinstance(cls.Options, type) and issubclass(cls.Options, RouterOptions):
            cls.arguments = {f.name: f.default for f in dataclasses.fields(cls.Options)}
            cls.causal_cutoff = calibrated_option(cls.Options)

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__()
        self.hidden_size = hidden_size
        self.capacity = capacity
        self.layer_index = layer_index
        self.options = parse_options(self.Options, self.name, kwargs)
        if self.causal_cutoff:
            self.calibrate_layers([layer_index])

    # --- what a router implements -------------------------------------------------------------
    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Return `[B, T]` scores; higher means more worth processing."""
        raise NotImplementedError

    def causal_keep(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """The causal rule: `[B, T]` bool keep decisions that use only token i for token i."""
        raise NotImplementedError

    def gate(self, logits: torch.Tensor) -> torch.Tensor | None:
        """`[B, T]` factor on the layer's delta per token, from the `[B, T]` scores (the kept
        tokens' entries are used). None = exactly 1, and no work at all.

        Exactly 1 with the gradient of sigmoid(logit): bounded. With the raw logit's gradient the
        LM loss pushes the selected tokens' logits without limit and training diverges (the
        history is in docs/architecture.md)."""
        return straight_through_one(torch.sigmoid(logits)) if logits.requires_grad else None

    def aux_loss(
        self, logits: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext
    ) -> torch.Tensor | None:
        """Auxiliary training loss for this layer (only called while training)."""
        return None

    def rule_statistic(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The `[B, T]` statistic a calibrated causal rule thresholds (default: the scores)."""
        return logits

    def cutoff_statistic(
        self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(values, eligible)`: what a calibrated cut-off thresholds and which entries share the
        capacity (default: `rule_statistic` over the routed tokens; `noop-expert`: each token's
        expert slots). The cut-off keeping `capacity` of them is their `topk_boundary`."""
        return self.rule_statistic(logits, hidden).detach().float(), ctx.routed()

    def calibrate_layers(self, layer_indices: list[int]) -> None:
        """One calibrated cut-off per layer this router instance serves (a shared router serves
        several, and each layer's scores have their own distribution): buffers indexed by slot."""
        self.calibration_slots = {index: slot for slot, index in enumerate(layer_indices)}
        self.register_buffer("calibrated_threshold", torch.zeros(len(layer_indices)))
        self.register_buffer("calibration_steps", torch.zeros(len(layer_indices), dtype=torch.long))
        self._cutoff_cache: dict = {}  # slot -> (buffers, their versions, resolved cut-off)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()` and the like move the calibrated cut-off but keep it float32: in
        bf16 a cut-off lands between representable values and its rule keeps another share
        (A-MoD kept 273 tokens of a target 192)."""
        super()._apply(fn, recurse)
        threshold = getattr(self, "calibrated_threshold", None)
        if threshold is not None and threshold.dtype != torch.float32:
            self.calibrated_threshold = threshold.float()
        return self

    def calibration_slot(self, layer_index: int) -> int:
        return self.calibration_slots[layer_index] if len(self.calibration_slots) > 1 else 0

    def causal_threshold(self, layer_index: int) -> torch.Tensor | float:
        """The causal rule's cut-off at `layer_index`: the number the user gave, else the
        calibrated value (`causal_cutoff`'s fallback until training has calibrated it). A tensor,
        so no host sync. At capacity 1 nothing is skipped in training, nor by the calibrated rule."""
        argument, fallback = self.causal_cutoff
        if self.options[argument] is not None:
            return self.options[argument]
        if self.capacity >= 1.0:
            return float("-inf")
        slot = self.calibration_slot(layer_index)
        if torch.compiler.is_compiling():
            return self._resolve_cutoff(slot, fallback)
        # Decoding asks once per token and layer: reuse the resolved cut-off until a buffer
        # changes (training and load_state_dict bump its version; .to() makes new tensors).
        buffers = (self.calibrated_threshold, self.calibration_steps)
        versions = tuple(b._version for b in buffers)
        cached = self._cutoff_cache.get(slot)
        if cached is None or any(a is not b for a, b in zip(cached[0], buffers)) or cached[1] != versions:
            cached = self._cutoff_cache[slot] = (buffers, versions, self._resolve_cutoff(slot, fallback))
        return cached[2]

    def _resolve_cutoff(self, slot: int, fallback: float) -> torch.Tensor:
        value = self.calibrated_threshold[slot]
        return torch.where(self.calibration_steps[slot] > 0, value, torch.full_like(value, fallback))

    @property
    def target_share(self) -> float | None:
        """The share of the routed tokens this router aims to keep: its capacity (a threshold
        router: its load target, None without one). A recipe may change it while training, e.g.
        to warm up from keeping everything."""
        return self.capacity

    @target_share.setter
    def target_share(self, share: float) -> None:
        self.capacity = share

    def extra_flops(self, matmul_only: bool = False) -> int:
        """FLOPs this router spent on its last decision beyond its own modules' matmuls (which a
        flop counter sees by itself), e.g. recomputing an attention map; with `matmul_only`, the
        part of it a flop counter does see (so it is not counted twice). Default: none."""
        return 0

    @classmethod
    def unsupported_reason(cls, model: nn.Module, adapter) -> str | None:
        """Why this router cannot convert `model` at all (one line; `convert` raises it, the
        conformance kits skip such models with it), e.g. a model with no mixture of experts for
        `noop-expert`. None: it can; per-layer checks belong in `prepare_model`."""
        return None

    @classmethod
    def prepare_model(cls, model: nn.Module, adapter, layer_indices: list[int], routers: dict) -> list:
        """Called once by `convert` before the model changes, with the routers built for
        `layer_indices`: validate the placement and attach what the routers observe (e.g. an
        attention probe). Returns handles with `remove()` that `unload` calls."""
        return []

    # --- the framework ------------------------------------------------------------------------
    def select(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor | float:
        """Training-time selection: a float capacity for static top-k, or a `[B, T]` bool keep mask."""
        if self.capacity_based:
            return float(self.capacity)
        return self.causal_keep(logits, hidden, ctx)

    def route(self, hidden: torch.Tensor, ctx: RoutingContext) -> RoutingDecision:
        logits = self.score(hidden, ctx)
        choice = self.causal_keep(logits, hidden, ctx) if ctx.causal else self.select(logits, hidden, ctx)
        segments = kept_total = None
        if isinstance(choice, float):
            static_prefix = ctx.prefix if ctx.real is None else 0
            forced = None if static_prefix else ctx.forced
            indices, valid, keep = select_topk(logits, choice, ctx.real, forced, prefix=static_prefix)
        elif ctx.pack and ctx.pack_slots is not None:
            indices, segments, keep, kept_total = pack_reserved(choice, ctx.real, ctx.forced, ctx.pack_slots)
            valid = None
        elif ctx.pack:
            indices, segments, keep = pack_rows(choice, ctx.real, ctx.forced, bucket=ctx.pack_bucket)
            valid = None
        else:
            indices, valid, keep = pack_mask(choice, ctx.real, ctx.forced)
        gate = self.gate(logits) if indices.shape[1] else None  # None at inference: no gather
        if gate is not None:
            if segments is not None:  # flat, with a gate of 1 for the dummy filler index
                gate = F.pad(gate.reshape(1, -1), (0, 1), value=1.0) if ctx.fillers else gate.reshape(1, -1)
            gate = gate.gather(1, indices)
        aux = self.aux_loss(logits, keep, hidden, ctx) if ctx.training else None
        if self.causal_cutoff and ctx.training and isinstance(choice, float) and choice < 1.0:
            with torch.no_grad():
                values, eligible = self.cutoff_statistic(logits, hidden, ctx)
                self.record_cutoff(topk_boundary(values, choice, eligible), ctx.layer_index)
        if self.cutoff_probe is not None and ctx.causal:
            with torch.no_grad():
                self.cutoff_probe(ctx.layer_index, *self.cutoff_statistic(logits, hidden, ctx))
        return RoutingDecision(indices, valid, gate, keep, aux, logits, segments, kept_total=kept_total)

    #: Set by `modadapt.calibrate_cutoffs` while it collects: called with `(layer_index, values,
    #: eligible)` on every decision made by the causal rule.
    cutoff_probe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    @torch.no_grad()
    def set_cutoff(self, layer_index: int, value: torch.Tensor | float) -> None:
        """Make `value` the calibrated cut-off of `layer_index` outright (no blending), as if
        calibrated: what `modadapt.calibrate_cutoffs` found for the rule inference uses."""
        slot = self.calibration_slot(layer_index)
        self.calibrated_threshold[slot] = torch.as_tensor(value, dtype=self.calibrated_threshold.dtype)
        self.calibration_steps[slot] = self.calibration_steps[slot].clamp_min(1)

    @torch.no_grad()
    def record_cutoff(self, batch: torch.Tensor, layer_index: int) -> None:
        """Blend one training batch's cut-off (NaN: the batch had none) into the calibrated one of
        `layer_index` (averaged over processes first within `statistics_over_processes`). `route`
        calls it with the top-k boundary; a router that selects otherwise calls it itself."""
        if over_processes():  # the processes' boundaries averaged: every process keeps the same cut-off
            here = ~torch.isnan(batch)
            summed = process_sum(torch.stack([torch.where(here, batch, 0.0), here.float()]))
            batch = torch.where(summed[1] > 0, summed[0] / summed[1].clamp_min(1), float("nan"))
        slot = self.calibration_slot(layer_index)
        old, seen = self.calibrated_threshold[slot], self.calibration_steps[slot]
        m = self.calibration_momentum
        blended = torch.where(seen > 0, (1 - m) * old + m * batch, batch)
        usable = ~torch.isnan(batch)
        self.calibrated_threshold[slot] = torch.where(usable, blended, old)
        self.calibration_steps[slot] += usable.long()


def contract_violation(cls: Any) -> str | None:
    """Why `cls` cannot be registered as a router (None: it honours the contract), checked by
    the registry so that a broken plugin fails when it loads, not in the middle of a forward."""
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        return f"{cls!r} is not a subclass of modadapt.Router"
    for flag in ("causal", "capacity_based", "graphable"):
        if not isinstance(getattr(cls, flag), bool):
            return f"{cls.__qualname__}.{flag} must be True or False, got {getattr(cls, flag)!r}"
    if not isinstance(cls.densest_layers, str) or not cls.densest_layers:
        return f"{cls.__qualname__}.densest_layers must be a layers rule such as 'every-other'"
    if cls.scopes is not None and (
        not isinstance(cls.scopes, tuple) or not cls.scopes or not set(cls.scopes) <= {"block", "attention", "mlp"}
    ):
        return f"{cls.__qualname__}.scopes must be None or a tuple of 'block', 'attention', 'mlp', got {cls.scopes!r}"
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, RouterOptions)):
        return f"{cls.__qualname__}.Options must be a RouterOptions dataclass, got {cls.Options!r}"
    for method in ("score", "causal_keep"):
        if getattr(cls, method) is getattr(Router, method):
            return f"{cls.__qualname__} does not implement `{method}`"
    return None


def kept_count(capacity: float, tokens: int | torch.Tensor) -> int | torch.Tensor:
    """`ceil(capacity * tokens)`, immune to float noise (0.1 * 30 must give 3, not 4)."""
    if isinstance(tokens, torch.Tensor):
        return torch.ceil(tokens.to(torch.float64) * capacity - 1e-9).long()
    return math.ceil(capacity * tokens - 1e-9)


def topk_boundary(stat: torch.Tensor, capacity: float, eligible: torch.Tensor) -> torch.Tensor:
    """The cut-off that keeps `capacity` of the batch's eligible tokens, pooled over rows: the
    statistic's k-th largest eligible value in the whole batch, k = ceil(capacity * n). A causal
    rule thresholds every token at one cut-off, so this is the value whose share kept is the
    capacity; each row's own boundary averaged over rows (the rule before) is not, where rows
    differ: on the H200 quality benchmark it kept 19.7% of the tokens at capacity 23.1%. NaN when
    no token is eligible or none would be kept (no host sync)."""
    if not stat.numel():
        return stat.new_tensor(float("nan"))
    flat = stat.masked_fill(~eligible, float("-inf")).reshape(-1)
    n = eligible.sum()
    k = kept_count(capacity, n)
    cut = flat.sort(descending=True).values.gather(0, (k.clamp(1, flat.numel()) - 1).reshape(1)).squeeze(0)
    return torch.where((n > 0) & (k > 0), cut, cut.new_tensor(float("nan")))


def select_topk(
    logits: torch.Tensor,
    capacity: float,
    real: torch.Tensor | None,
    forced: torch.Tensor | None,
    prefix: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Top-k per row with a static slot count and no host sync on the common path.

    Each row keeps its forced tokens plus `ceil(capacity * n_eligible)` of its eligible tokens,
    so a padded row keeps what it would keep alone. Without padding, with no forced tokens but a
    static `prefix` (always kept), this is `topk` + sort on a static shape.
    """
    B, T = logits.shape
    if real is None and forced is None:
        prefix = min(prefix, T)
        k = prefix + kept_count(capacity, T - prefix)
        if prefix:
            logits = logits.clone()
            logits[:, :prefix] = float("inf")
        indices = logits.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        keep = torch.zeros(B, T, dtype=torch.bool, device=logits.device).scatter_(1, indices, True)
        return indices, None, keep
    eligible = torch.ones(B, T, dtype=torch.bool, device=logits.device)
    if real is not None:
        eligible = eligible & real
    if forced is not None:
        forced = forced & (real if real is not None else True)
        eligible = eligible & ~forced
    k = max(0, min(kept_count(capacity, T), T))
    n_eligible = eligible.sum(1, keepdim=True)
    k_row = kept_count(capacity, n_eligible)
    masked = logits.masked_fill(~eligible, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=logits.device).expand(B, T))
    keep = eligible & (rank < k_row)
    if forced is not None:
        keep = keep | forced
        return pack_mask(keep, None, None)
    return pack_mask(keep, None, None, slots=k)


def pack_mask(
    keep: torch.Tensor, real: torch.Tensor | None, forced: torch.Tensor | None, slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pack a `[B, T]` keep mask into sorted indices of width `slots` (default: the largest row).

    Kept tokens come first in ascending order; the remaining slots are filled with unkept tokens
    (distinct indices, so scattering identity values there is harmless) and marked invalid.
    """
    keep = _apply_roles(keep, real, forced)
    B, T = keep.shape
    counts = keep.sum(1)
    all_valid = False
    if slots is None:  # variable count: one host sync for the widest and narrowest row
        slots, fewest = torch.stack([counts.max(), counts.min()]).tolist() if B and T else (0, 0)
        all_valid = fewest == slots
    order_key = (~keep).long() * T + torch.arange(T, device=keep.device)
    indices = order_key.argsort(dim=1)[:, :slots]
    valid = None if all_valid else torch.arange(slots, device=keep.device) < counts[:, None]
    return indices, valid, keep


def pack_rows(
    keep: torch.Tensor, real: torch.Tensor | None, forced: torch.Tensor | None, bucket: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept tokens of all rows as one packed sequence: `[1, N]` indices into the flattened
    `[B * T]` tokens (row after row, ascending), the `[B + 1]` int32 row offsets, and the mask.
    One host sync (the count N), as for `pack_mask`, and no sort. With `bucket`, N is rounded up
    to a multiple of it with filler indices `B * T` in one more segment (`[B + 2]` offsets)."""
    keep = _apply_roles(keep, real, forced)
    segments = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    segments[1:] = keep.sum(1).cumsum(0)
    if bucket:
        indices = _bucketed_nonzero(keep.reshape(-1), bucket)
        return indices, torch.cat([segments, segments.new_full((1,), indices.shape[1])]), keep
    indices = keep.reshape(-1).nonzero().reshape(1, -1)  # last: the host waits here
    return indices, segments, keep


def pack_reserved(
    keep: torch.Tensor, real: torch.Tensor | None, forced: torch.Tensor | None, slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_rows` into exactly `slots` slots, with no host sync: the kept tokens, then filler
    indices `B * T` in segments of at most `T` (so that attention over them costs no more than
    rows do; `B + 1 + ceil(slots / T)` offsets, the unused ones empty). Returns the indices,
    offsets, mask and the 0-dim count of kept tokens: above `slots`, the selection is cut after
    the first `slots` (offsets clamped, so every kernel stays in bounds) and the caller must not
    use the result (`ModConfig.pack_reserve` runs the forward again)."""
    keep = _apply_roles(keep, real, forced)
    B, T = keep.shape
    ends = keep.sum(1).cumsum(0)
    kept = ends[-1]
    fillers = kept + torch.arange(T, (-(-slots // T) + 1) * T, T, device=keep.device)  # chunks of T
    # few ops: at batch 1 a prefill's MoD layers are bound by the host
    segments = F.pad(torch.cat([ends, fillers]).clamp(max=slots), (1, 0)).to(torch.int32)
    flat = keep.reshape(-1)
    indices = torch.nonzero_static(flat, size=slots, fill_value=flat.shape[0]).reshape(1, -1)
    return indices, segments, keep, kept


@torch.compiler.disable
def _bucketed_nonzero(flat_keep: torch.Tensor, bucket: int) -> torch.Tensor:
    """`[1, N']` indices of the kept tokens, then `B * T` up to N' = N rounded up to `bucket`. Run
    outside torch.compile: the graphs after it see the bucketed size only, not the count."""
    indices = flat_keep.nonzero().reshape(1, -1)
    pad = -indices.shape[1] % bucket
    return F.pad(indices, (0, pad), value=flat_keep.shape[0]) if pad else indices


def _apply_roles(keep: torch.Tensor, real: torch.Tensor | None, forced: torch.Tensor | None) -> torch.Tensor:
    """Padding is never kept; forced (real) tokens always are."""
    if real is not None:
        keep = keep & real
    if forced is not None:
        keep = keep | (forced & (real if real is not None else True))
    return keep
