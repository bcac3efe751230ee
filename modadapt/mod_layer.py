"""The generic MoD layer: route, gather, run the original layer on the subset, scatter back.

Converting a layer swaps its class for a cached subclass whose `forward` is `mod_forward`; the
original `forward` runs on the kept tokens. The module stays where it was, so transformers' output
hooks, gradient checkpointing and state-dict names keep working (the router is the only new key).
With `ModConfig.scope` 'attention' or 'mlp' the routed module is that sublayer of the layer (its
`LayerCall.skipped` set): it returns what the layer adds to the residual, zeros for skipped
tokens; the layer around it (the host) runs as it is and tells it the call's positions and how
many tokens came before (`Host`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import varlen
from .adapters.base import LayerCall, TokenRoles
from .masks import subset_attention_mask
from .routers.base import RoutingContext, RoutingDecision

#: The attribute of a converted model that holds its `ModelState`.
STATE_ATTR = "_modadapt_state"
#: `pack_reserve="auto"` reserves this multiple of the most a layer has kept, rounded up to a
#: multiple of `AUTO_RESERVE_STEP` (then `pack_bucket`), learnt from calls of at least this many
#: tokens (a share of a few tokens says little). The rounding keeps a layer's slots fixed while its
#: share creeps up: each new slot count is a new shape, which `torch.compile(dynamic=False)`
#: compiles anew (on an H200, unrounded, 5 of the first 6 compiled prefills of 1.1B took 2-4 s:
#: new reserves, and the exact reruns of the 6 forwards that overflowed one).
AUTO_RESERVE_MARGIN = 1.1
AUTO_RESERVE_STEP = 1 / 16
AUTO_RESERVE_MIN_TOKENS = 128
_CLASSES: dict[type, type] = {}
_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ModelState:
    """Shared by all MoD layers of one converted model; not part of the state dict."""

    config: Any  # ModConfig
    adapter: Any  # Adapter
    layer_indices: list[int]
    roles: TokenRoles = field(default_factory=TokenRoles)
    layers: list = field(default_factory=list)  # LayerState of each MoD layer, in stack order
    hooks: list = field(default_factory=list)
    dense: bool = False  # inside `modadapt.dense(model)`: every MoD layer runs its original forward
    family: dict = field(default_factory=dict)  # what the adapter's `attach` keeps for this conversion
    #: `ModConfig.pack_reserve`'s bookkeeping: whether a stack forward that holds no KV cache is
    #: running (the check at its end guards the reserved slots; a rerun on a cache would append to
    #: it twice), the forward's reserved packs as `(LayerState, kept count on the device, tokens,
    #: slots)` (read together at its end), whether exact counts are required (the stack running
    #: again; a calibration), and how often it ran again.
    cache_free_stack: bool = False
    pack_counts: list = field(default_factory=list)
    pack_exact: bool = False
    pack_reruns: int = 0

    def config_dict(self) -> dict:
        """The ModConfig with its layer rule resolved to the converted indices (what `load` needs)."""
        return {**self.config.to_dict(), "layers": list(self.layer_indices)}


def state_of(model: nn.Module) -> ModelState | None:
    """The conversion state of `model` (config, adapter, MoD layers), or None if it is not converted."""
    return getattr(model, STATE_ATTR, None)


@dataclass
class LayerState:
    """Per MoD layer: how to call it, and what its last forward decided (for stats and losses)."""

    index: int
    call: LayerCall
    model: ModelState
    last_keep: torch.Tensor | None = None
    last_real: torch.Tensor | None = None
    last_aux: torch.Tensor | None = None
    #: `RoutingDecision.expert_slots` of the last forward (the experts each token ran, where the
    #: router drops mixture-of-experts slots too), or None.
    last_slots: torch.Tensor | None = None
    #: Whether the original layer is running on the kept tokens right now (not on its input as is),
    #: and which of the slots it holds are real tokens (`[B, K]`, or `[1, N]` packed; None: all):
    #: what a sublayer's statistics (a MoE router's load) must count.
    on_subset: bool = False
    subset_valid: torch.Tensor | None = None
    #: A routed sublayer: `(positions, tokens seen before)` of the host layer's current call.
    host: tuple | None = None
    #: A routed sublayer with an output norm (`LayerCall.output_norm`): the gate `[B, T]` its norm
    #: applies next (1 where skipped), or None.
    output_gate: torch.Tensor | None = None
    #: The largest share of a call's tokens this layer kept in a reserved pack of a call of at least
    #: `AUTO_RESERVE_MIN_TOKENS` tokens (read at the end of each such forward): what
    #: `pack_reserve="auto"` reserves from. None: not seen yet (or reset by `calibrate_cutoffs`).
    reserve_share: float | None = None


class Host:
    """Hooks on the layer around a routed sublayer: its call's position ids and how many tokens
    the layer saw before (`Adapter.cached_tokens`), for the sublayer's routing context (an MLP has
    neither). An object, not closures, so that `copy.deepcopy(model)` binds the copy's own."""

    def __init__(self, state: LayerState, call: LayerCall):
        self.state, self.call = state, call

    def before(self, module, args, kwargs):
        arguments = _CallArguments(self.call, module, args, kwargs)
        cache = arguments.get(self.call.cache)
        seen = self.state.model.adapter.cached_tokens(cache, self.state.index) if cache is not None else 0
        self.state.host = (arguments.get(self.call.position_ids), seen)

    def after(self, module, args, kwargs, output):
        self.state.host = None


class ModLayer:
    """Mixin placed before the original layer class; see the module docstring."""

    router: nn.Module
    mod_state: LayerState

    def forward(self, *args, **kwargs):
        if self.mod_state.model.dense:
            return self._mod_original.forward(self, *args, **kwargs)
        return mod_forward(self, args, kwargs)


class GatedOutput:
    """Mixin placed before the class of the norm after a routed sublayer (`LayerCall.output_norm`,
    post-norm layers): it scales its output by the gate the sublayer left (`LayerState.output_gate`)."""

    mod_gate_of: LayerState

    def forward(self, *args, **kwargs):
        out = self._mod_original.forward(self, *args, **kwargs)
        state = self.mod_gate_of
        gate, state.output_gate = state.output_gate, None
        return out if gate is None else out * gate.to(out.dtype).unsqueeze(-1)


_GATED_CLASSES: dict[type, type] = {}


def gate_output(norm: nn.Module, state: LayerState) -> None:
    """Let `norm` apply the gate of the sublayer before it (class swap; `ungate_output` undoes it)."""
    original = type(norm)
    if original not in _GATED_CLASSES:
        _GATED_CLASSES[original] = type(
            f"Gated{original.__name__}", (GatedOutput, original), {"_mod_original": original}
        )
    norm.__class__ = _GATED_CLASSES[original]
    norm.mod_gate_of = state


def ungate_output(norm: nn.Module) -> None:
    del norm.mod_gate_of
    norm.__class__ = norm._mod_original


def routed_module(layer: nn.Module) -> nn.Module:
    """The module of a converted layer that routes: the layer, or its routed sublayer."""
    if isinstance(layer, ModLayer):
        return layer
    return next(m for m in layer.modules() if isinstance(m, ModLayer))


def mod_class(original: type) -> type:
    """The cached MoD subclass of a layer class (same name with a `Mod` prefix)."""
    if original not in _CLASSES:
        _CLASSES[original] = type(f"Mod{original.__name__}", (ModLayer, original), {"_mod_original": original})
    return _CLASSES[original]


def _gather_tokens(value: Any, index: torch.Tensor) -> Any:
    """Gather dim 1 of a per-token tensor (or each tensor of a tuple) at `index` `[B, K]`."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_tokens(v, index) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return value
    B, K = index.shape
    if B == 1 and value.shape[0] == 1:  # a packed call's one row: one op
        return value.index_select(1, index[0])
    value = value.expand(B, *value.shape[1:])
    idx = index.view(B, K, *([1] * (value.dim() - 2))).expand(B, K, *value.shape[2:])
    return value.gather(1, idx)


class _CallArguments:
    """Named access to a layer call's arguments, whether passed by position, name or **kwargs.

    Binding by hand (not `Signature.bind`) keeps the per-call host cost low; layers are called
    once per token at decode.
    """

    def __init__(self, call: LayerCall, layer: nn.Module, args: tuple, kwargs: dict):
        names = call.positional_names
        if len(args) > len(names):
            raise TypeError(f"{type(layer).__name__}.forward got {len(args)} positional arguments")
        self.named = dict(zip(names, args))
        self.named.update(kwargs)

    def get(self, name: str | None) -> Any:
        return self.named.get(name) if name is not None else None

    def set(self, name: str, value: Any) -> None:
        self.named[name] = value


def _routing_context(layer: nn.Module, state: LayerState, hidden: torch.Tensor, arguments: _CallArguments, seen: int):
    B, T = hidden.shape[:2]
    roles = state.model.roles
    real = roles.real[:, -T:] if roles.real is not None else None
    forced = roles.forced[:, -T:] if roles.forced is not None else None
    prefix = max(0, min(T, state.call.prefix_tokens - seen))
    if prefix:  # class / distillation / register tokens: always processed
        prefix_mask = (torch.arange(T, device=hidden.device) < prefix).expand(B, T)
        forced = prefix_mask if forced is None else forced | prefix_mask
        if roles.forced is not None:
            prefix = 0  # other forced roles too: the general (variable-count) path handles all
    else:
        prefix = 0
    positions = arguments.get(state.call.position_ids)
    if not isinstance(positions, torch.Tensor) and state.host is not None:
        positions = state.host[0]
    if not isinstance(positions, torch.Tensor) or positions.shape[-1] != T:
        positions = torch.arange(seen, seen + T, device=hidden.device)
    decoding = seen > 0
    return RoutingContext(
        layer_index=state.index,
        real=real,
        forced=forced,
        positions=positions.expand(B, T),
        # A bidirectional layer (ViT) never decodes: it keeps its top-k selection in eval mode.
        causal=decoding
        or (not layer.training and state.model.config.inference_routing == "causal" and state.call.causal),
        training=layer.training and torch.is_grad_enabled(),
        roles={k: v[:, -T:] for k, v in roles.extra.items()},
        prefix=prefix,
    )


def can_pack(layer: nn.Module, hidden: torch.Tensor, book, span: int, causal: bool, reserved: bool = False) -> bool:
    """Whether this call may run rows' kept tokens packed (`modadapt.varlen`): a batch with no
    cache, an empty one (a prefill) or a packed one (a decode step), on a layer whose adapter
    supports it, with SDPA and no window cutting the span, when the router selects by a mask
    (a capacity router's training-time top-k has a static shape: nothing to gain). One row packs
    only into `reserved` slots (else its rows layout needs no filler and no mask)."""
    state: LayerState = layer.mod_state
    call, mode = state.call, state.model.config.packing
    if mode == "padded" or (hidden.shape[0] < 2 and not reserved):
        return False
    if layer.router.capacity_based and not causal:
        return False
    if call.token_wise:  # no attention: the packed sequence needs no kernel
        return True
    if call.packed_attention is None:
        return False
    if book is not None and not book.mod_can_pack(hidden.shape[1]):
        return False
    if call.mask is None or (call.window is not None and span > call.window):
        return False
    if call.attn_implementation() != "sdpa":
        return False
    return mode == "packed" or varlen.has_fast_kernel(hidden)


def _plain_decode_step(state: LayerState, book, seen: int) -> bool:
    """A one-token step of one sequence whose cached keys are all real and in reach: the layer
    then runs on its input as is, with no mask (the token may see every cached key)."""
    roles, window = state.model.roles, state.call.window
    return (
        book is not None
        and book.mod_all_valid
        and roles.real is None
        and roles.forced is None
        and not state.call.prefix_tokens
        and (window is None or seen + 1 <= window)
        and not torch.is_grad_enabled()
    )


def _decode_one_token(layer: nn.Module, arguments: _CallArguments, hidden: torch.Tensor, book, ctx) -> Any:
    """The decode fast path (batch 1): the causal rule, one host sync, and either the input back
    (skipped: no K/V written, none read) or the original layer on the token with no gather,
    mask or scatter. Host time is what bounds eager decoding, so this path does the least."""
    state: LayerState = layer.mod_state
    call = state.call
    logits = layer.router.score(hidden, ctx)
    keep = layer.router.causal_keep(logits, hidden, ctx)
    state.last_keep, state.last_real, state.last_aux, state.last_slots = keep.detach(), None, None, None
    seen = book.mod_seen
    book.mod_seen += 1
    if not bool(keep):
        return call.skipped(hidden) if call.skipped is not None else hidden
    if call.mask:
        arguments.set(call.mask, None)
    state.on_subset = True  # the layer runs on the token it kept (all of its slots are real)
    try:
        out = _call_original(layer, arguments, off_cudnn=True)
    finally:
        state.on_subset = False
    book.mod_append(seen)
    gate = layer.router.gate(logits)
    if gate is None:
        return out
    if call.output_norm is not None:  # the norm after the sublayer applies it
        state.output_gate = gate
        return out
    result = _gated(call, out[0] if isinstance(out, tuple) else out, gate, hidden)
    return (result, *out[1:]) if isinstance(out, tuple) else result


def _call_original(layer: nn.Module, arguments: _CallArguments, off_cudnn: bool) -> Any:
    """The original layer forward. `off_cudnn` on CUDA: cuDNN attention re-plans for every new
    shape, and MoD cache lengths and masks rarely repeat one."""
    if off_cudnn and arguments.get(layer.mod_state.call.hidden).is_cuda:
        with sdpa_kernel(_MASKED_BACKENDS):
            return layer._mod_original.forward(layer, **arguments.named)
    return layer._mod_original.forward(layer, **arguments.named)


def apply_gate(out: torch.Tensor, gate: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """`y = f + (g - 1)(f - x)`: exactly the layer's output `f` when the gate is 1 (or None)."""
    if gate is None:
        return out
    return out + (gate - 1).to(out.dtype).unsqueeze(-1) * (out - hidden)


def _gated(call: LayerCall, out: torch.Tensor, gate: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """A block's `apply_gate`; a sublayer's output is what the layer adds to the residual: `g * f`
    (a sublayer with an output norm leaves the gate to that norm)."""
    if call.skipped is None:
        return apply_gate(out, gate, hidden)
    return out if gate is None or call.output_norm is not None else out * gate.to(out.dtype).unsqueeze(-1)


def _flatten_rows(value: Any, B: int, T: int, dummy_row: bool = False) -> Any:
    """A per-token tensor (or tuple of them) `[B or 1, T, ...]` as one row `[1, B * T, ...]`;
    `dummy_row` appends one zero token, what the filler indices of a bucketed pack point at."""
    if isinstance(value, (tuple, list)):
        return type(value)(_flatten_rows(v, B, T, dummy_row) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return value
    flat = value if B == 1 else value.expand(B, *value.shape[1:]).reshape(1, B * T, *value.shape[2:])
    if dummy_row:  # one op: the eager call is bound by the host at batch 1 (one row's prefill)
        flat = F.pad(flat, (0, 0) * (flat.dim() - 2) + (0, 1))
    return flat


def mod_forward(layer: nn.Module, args: tuple, kwargs: dict):
    state: LayerState = layer.mod_state
    call = state.call
    arguments = _CallArguments(call, layer, args, kwargs)
    hidden = arguments.get(call.hidden)
    B, T = hidden.shape[:2]
    state.output_gate = None
    cache = arguments.get(call.cache)
    book = state.model.adapter.mod_cache_layer(cache, state.index) if cache is not None else None
    seen = book.mod_seen if book is not None else state.host[1] if state.host is not None else 0

    ctx = _routing_context(layer, state, hidden, arguments, seen)
    if B == 1 and T == 1 and _plain_decode_step(state, book, seen):
        return _decode_one_token(layer, arguments, hidden, book, ctx)
    reserve = _pack_reserve(layer, state.model, book)
    ctx.pack = can_pack(layer, hidden, book, seen + T, ctx.causal, reserved=reserve is not None)
    if ctx.pack and book is None:  # a cached call appends exact counts to the cache
        ctx.pack_bucket = state.model.config.pack_bucket
        if reserve is not None:
            ctx.pack_slots = reserved_slots(reserve, B * T, ctx.pack_bucket)
    fillers = ctx.fillers
    flat = {}
    if ctx.pack:  # launched before routing syncs with the host, so the GPU is not left waiting
        for name in (*call.per_token, call.position_ids):
            if name is not None and arguments.get(name) is not None:
                flat[name] = _flatten_rows(arguments.get(name), B, T, dummy_row=fillers)
    decision: RoutingDecision = layer.router.route(hidden, ctx)
    _record(state, decision, ctx)
    if decision.kept_total is not None:  # read once, at the end of the stack's forward
        state.model.pack_counts.append((state, decision.kept_total, B * T, ctx.pack_slots))

    K = decision.indices.shape[1]
    if K == 0:  # nothing to process in any row: skip the layer outright, write no K/V
        if book is not None:
            book.mod_advance(T)
        return call.skipped(hidden) if call.skipped is not None else hidden

    packed = decision.segments is not None
    rows = hidden
    if packed:  # all rows as one: [1, B * T] (+ the dummy row fillers index); `decision.indices` index it
        hidden = _flatten_rows(hidden, B, T, dummy_row=fillers)
        for name, value in flat.items():
            arguments.set(name, value)
    index = decision.indices
    gather_index = index.unsqueeze(-1).expand(*index.shape, hidden.shape[-1])
    hidden_sub = hidden.gather(1, gather_index)
    arguments.set(call.hidden, hidden_sub)
    for name in (*call.per_token, call.position_ids):
        if name is not None and arguments.get(name) is not None:
            arguments.set(name, _gather_tokens(arguments.get(name), index))
    state.on_subset = True
    state.subset_valid = index < B * T if fillers else decision.valid  # filler tokens index B * T
    try:
        if packed:
            # a row's segment, or the fillers' (a reserve's come in segments of at most T)
            longest = T if ctx.pack_slots is not None else max(T, ctx.pack_bucket or 0)
            out = _run_packed(layer, arguments, decision, book, T, seen, longest=longest)
        else:
            out = _run_rows(layer, arguments, decision, book, T, seen, hidden.dtype)
    finally:
        state.on_subset, state.subset_valid = False, None
    out_sub = _gated(call, out[0] if isinstance(out, tuple) else out, decision.gate, hidden_sub)
    if book is not None:
        book.mod_advance(T)
    # A block's skipped tokens keep their input; a sublayer adds nothing for them.
    base = hidden if call.skipped is None else torch.zeros_like(hidden)
    if decision.valid is not None:
        out_sub = torch.where(decision.valid.unsqueeze(-1), out_sub, hidden_sub if call.skipped is None else 0)
    result = base.scatter(1, gather_index, out_sub.to(hidden.dtype))
    result = result[:, : B * T].reshape(rows.shape) if fillers else result.view_as(rows)
    if call.output_norm is not None and decision.gate is not None:  # for the norm after the sublayer
        gate = decision.gate if decision.valid is None else torch.where(decision.valid, decision.gate, 1)
        gate = torch.ones(hidden.shape[:2], dtype=gate.dtype, device=gate.device).scatter(1, index, gate)
        state.output_gate = gate[:, : B * T].reshape(B, T) if fillers else gate.view(B, T)
    return (result, *out[1:]) if isinstance(out, tuple) else result


def _pack_reserve(layer: nn.Module, model: ModelState, book) -> float | None:
    """`ModConfig.pack_reserve` where it applies: an eval call inside a stack forward that holds
    no KV cache (its end checks the overflow, and may run it again), unless exact counts are
    asked for (the rerun itself; `calibrate_cutoffs`, whose statistics a discarded pass would skew)."""
    reserve = model.config.pack_reserve
    if reserve is None or book is not None or layer.training or not model.cache_free_stack or model.pack_exact:
        return None
    if reserve == "auto":
        return auto_reserve(layer.mod_state.reserve_share)
    return reserve


def auto_reserve(share: float | None) -> float:
    """What `pack_reserve="auto"` reserves for a layer that has kept at most `share` of a call's
    tokens: every token before it has seen a call, else `AUTO_RESERVE_MARGIN` times the share
    rounded up to a multiple of `AUTO_RESERVE_STEP`, at most all."""
    if share is None:
        return 1.0
    steps = math.ceil(share * AUTO_RESERVE_MARGIN / AUTO_RESERVE_STEP - 1e-9)
    return min(1.0, steps * AUTO_RESERVE_STEP)


def reserved_slots(reserve: float, tokens: int, bucket: int | None) -> int:
    """The slots `reserve` of `tokens` takes: rounded up, to a multiple of `bucket` if given."""
    step = bucket or 1
    return max(step, -(-math.ceil(reserve * tokens) // step) * step)


def _run_packed(
    layer: nn.Module, arguments: _CallArguments, decision: RoutingDecision, book, T: int, seen: int, longest: int
):
    """The original layer on all rows' kept tokens as one sequence; its attention runs per row
    (`modadapt.varlen`) and, with a cache, appends the new K/V to the packed cache itself.
    `longest` bounds a segment's length (`T`, or a bucket's filler segment)."""
    call = layer.mod_state.call
    if call.token_wise:  # no attention: the tokens in one row are all it needs
        return layer._mod_original.forward(layer, **arguments.named)
    arguments.set(call.mask, None)
    arguments.set(varlen.SEGMENTS_KWARG, decision.segments)
    arguments.set(varlen.MAX_LEN_KWARG, (longest, seen + longest))
    if book is not None:  # the layer leaves the cache alone; the attention appends to it
        positions = decision.indices[0] % T + seen
        arguments.set(call.cache, None)
        arguments.set(varlen.APPEND_KWARG, lambda k, v, seg: book.mod_packed_update(k, v, seg, positions))
    with call.packed_attention():
        return layer._mod_original.forward(layer, **arguments.named)


def _run_rows(
    layer: nn.Module, arguments: _CallArguments, decision: RoutingDecision, book, T: int, seen: int, dtype: torch.dtype
):
    """The original layer on each row's kept tokens (filler slots where rows keep fewer), with a
    mask built from the tokens' sequence indices; the cache is kept in the rows layout."""
    call = layer.mod_state.call
    index = decision.indices
    if book is not None:
        book.mod_as_rows()
    mask = None
    if call.mask:
        past_index, past_valid = book.mod_past() if book is not None else (None, None)
        mask = subset_attention_mask(
            call.attn_implementation(),
            query_index=index + seen,
            query_valid=decision.valid,
            past_index=past_index,
            past_valid=None if book is not None and book.mod_all_valid else past_valid,
            causal=call.causal,
            window=call.window,
            span=seen + T,
            dtype=dtype,
        )
        arguments.set(call.mask, mask)
    out = _call_original(layer, arguments, off_cudnn=mask is not None or book is not None)
    if book is not None:
        book.mod_record(index + seen, decision.valid)
    return out


def _record(state: LayerState, decision: RoutingDecision, ctx: RoutingContext) -> None:
    state.last_keep = decision.keep.detach()
    state.last_real = ctx.real
    state.last_aux = decision.aux_loss
    state.last_slots = decision.expert_slots
