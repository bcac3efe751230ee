"""Mixture-of-experts blocks inside MoD layers (staged MoDE: Mixtral, Qwen2-MoE, Qwen3-MoE).

A MoD router decides which tokens enter a layer; the layer's MLP is a mixture of experts whose own
router (the family's top-k router) then sees only the tokens the MoD layer holds. Its load-balancing
loss and expert counts must count kept real tokens only: transformers computes the loss from every
layer's router logits as if each layer held all `B * T` tokens (with the attention mask over them),
which a MoD layer does not (it holds `B * K`, filler slots included, or a packed `N`).

`attach_experts` hooks every expert router of the stack and records, per call, its logits and which
of its rows are real tokens: a dense layer's rows are the call's tokens (padding excluded by the
attention mask), a MoD layer's the slots it runs (`LayerState.subset_valid`: filler slots and
bucket fillers excluded). The model's own loss computation is switched off (`output_router_logits=False`
is passed down) and done here instead, on the recorded rows, with transformers' formula (Switch
Transformer, eqs. 4-6, over all layers' rows together):

    aux = E * sum_e (share of top-k assignments to e) * (mean router probability of e)

When the call asked for router logits (`output_router_logits`, from the call or the config), the
output carries that loss as `aux_loss` (transformers' field) and the recorded logits as
`router_logits`, and with labels `router_aux_loss_coef * aux_loss` is added to `loss`, beside the
MoD routers' own loss (`router_aux_loss`). The router classes are the ones the model declares for
`router_logits` in `_can_record_outputs`: no modeling code is copied.

The assignments counted are the ones the router returned (its `indices`, so a layer whose top-k was
changed counts its own). A router that hands some slots to no expert at all (integrated MoDE:
`noop-expert`'s no-op expert) marks them in its output's `dropped_slots` (`[N, k]` bool): they
count as no assignment, and the statistics report their share.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ExpertRecord:
    """One call of a layer's expert router.

    Attributes:
        layer: The layer's index in the stack.
        logits: `[N, E]` router logits of the rows the router saw.
        valid: `[N]` bool, the rows that are real tokens (None: all of them).
        mod: Whether a MoD layer ran the router on the tokens it kept.
        selected: `[N, k]` the experts the router sent each row to (None: the top-k of `logits`).
        dropped: `[N, k]` bool, the slots it sent to no expert (the no-op expert), or None.
    """

    layer: int
    logits: torch.Tensor
    valid: torch.Tensor | None
    mod: bool
    selected: torch.Tensor | None = None
    dropped: torch.Tensor | None = None

    def assignments(self, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[N, k]` experts per row and `[N, k]` float weights: 1 for a real row's slot that went
        to an expert, 0 for padding, filler rows and dropped slots."""
        selected = self.selected
        if selected is None:  # softmax keeps the order
            selected = torch.topk(self.logits.float(), top_k, dim=-1).indices
        weight = torch.ones(selected.shape, dtype=torch.float32, device=selected.device)
        if self.valid is not None:
            weight = weight * self.valid.float()[:, None]
        if self.dropped is not None:
            weight = weight * (~self.dropped).float()
        return selected, weight


def router_spec(model: nn.Module) -> tuple[tuple, int] | None:
    """The classes (or class-name suffixes) of the model's expert routers and the index of the
    logits in their output, from `_can_record_outputs["router_logits"]`; None: not a MoE model."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        return None
    from transformers.utils.output_capturing import OutputRecorder

    specs = spec if isinstance(spec, list) else [spec]
    targets, index = [], 0
    for item in specs:
        if isinstance(item, OutputRecorder):
            targets.append(item.target_class or item.class_name)
            index = item.index
        else:
            targets.append(item)
    return tuple(targets), index


def _is_router(module: nn.Module, targets: tuple) -> bool:
    return any(type(module).__name__.endswith(t) if isinstance(t, str) else isinstance(module, t) for t in targets)


def load_balancing_loss(records: list[ExpertRecord], num_experts: int, top_k: int) -> torch.Tensor | None:
    """transformers' load-balancing loss over the real rows of `records` (all layers together):
    `E * sum_e f_e * P_e`, `f_e` the real rows' assignments to expert e per row (a dropped slot is
    none) and `P_e` the mean router probability of e. None: no real row."""
    if not records:
        return None
    device = records[0].logits.device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for record in records:
        probs = torch.softmax(record.logits.float(), dim=-1)
        selected, slot_weight = record.assignments(top_k)
        weight = (
            record.valid.float()
            if record.valid is not None
            else torch.ones(probs.shape[0], dtype=torch.float32, device=device)
        )
        assigned = assigned.scatter_add(0, selected.reshape(-1), slot_weight.reshape(-1))
        probability = probability + (probs * weight[:, None]).sum(0)
        rows = rows + weight.sum()
    return (assigned / rows * probability / rows).sum() * num_experts


def expert_router(model: nn.Module, mlp: nn.Module) -> nn.Module | None:
    """The experts' router inside `mlp` (the class the model records `router_logits` from), or None."""
    spec = router_spec(model)
    if spec is None:
        return None
    return next((m for m in mlp.modules() if _is_router(m, spec[0])), None)


def expert_weights(model: nn.Module, mlp: nn.Module) -> dict[str, int] | None:
    """What one token of the mixture of experts `mlp` passes through besides its linear maps:
    ``router`` (the experts' router's own weight matrix), ``expert`` (one expert: `1 / E` of each
    expert bank, the 3-D parameters stacked `[E, ...]`) and ``top_k`` (experts per token). None
    for an MLP without experts."""
    router = expert_router(model, mlp)
    if router is None:
        return None
    expert = sum(p.numel() // p.shape[0] for p in mlp.parameters() if p.dim() == 3)
    own = sum(p.numel() for p in router.parameters(recurse=False) if p.dim() == 2)
    return {"router": own, "expert": expert, "top_k": int(router.top_k)}


class ExpertRecorder:
    """The expert routers' calls of one forward (see the module docstring). An object, not
    closures, so that `copy.deepcopy(model)` gives the copy a recorder bound to the copy."""

    def __init__(
        self, model: nn.Module, state: Any, stack: nn.ModuleList, index: int, num_experts: int, top_k: int, coef: float
    ):
        self.model, self.state, self.stack = model, state, stack
        # Each MoD layer's routing state (on the layer, or on its routed sublayer).
        self.routed = {layer.index: layer for layer in state.layers}
        self.index, self.num_experts, self.top_k, self.coef = index, num_experts, top_k, coef
        self.records: list[ExpertRecord] = []
        self.recording = False  # between the stack's pre- and post-hook: a backward's recompute is not a call
        self.wanted = False  # the current top-level call asked for router logits

    # --- hooks ------------------------------------------------------------------------------------
    def router_called(self, layer: int, output: Any) -> None:
        if not self.recording:
            return
        logits = output[self.index] if isinstance(output, (tuple, list)) else output
        mod_state = self.routed.get(layer)
        on_subset = mod_state is not None and mod_state.on_subset
        if on_subset:
            valid = mod_state.subset_valid
        else:
            real = self.state.roles.real
            valid = real[:, -(logits.shape[0] // real.shape[0]) :] if real is not None else None
        if valid is not None:
            valid = valid.reshape(-1)
        selected = output[-1] if isinstance(output, (tuple, list)) else None  # (logits, weights, indices)
        if not (isinstance(selected, torch.Tensor) and selected.dim() == 2 and not selected.is_floating_point()):
            selected = None
        dropped = getattr(output, "dropped_slots", None)
        self.records.append(ExpertRecord(layer, logits, valid, on_subset, selected, dropped))

    def before_stack(self, module, args, kwargs):
        self.records, self.recording = [], True

    def after_stack(self, module, args, kwargs, output):
        self.recording = False

    def before_model(self, module, args, kwargs):
        wanted = kwargs.get("output_router_logits")
        if wanted is None:
            wanted = getattr(self.model.config.get_text_config(decoder=True), "output_router_logits", False)
        self.wanted = bool(wanted)
        return args, {**kwargs, "output_router_logits": False}  # transformers' own loss miscounts MoD layers

    def after_model(self, module, args, kwargs, output):
        if not self.wanted:
            return output
        aux = load_balancing_loss(self.records, self.num_experts, self.top_k)
        labels = kwargs.get("labels") is not None
        if isinstance(output, tuple):  # return_dict=False: the loss first when labels were given
            if labels and aux is not None and output and isinstance(output[0], torch.Tensor):
                return (output[0] + self.coef * aux.to(output[0].dtype), *output[1:])
            return output
        if not hasattr(output, "get"):
            return output
        if aux is not None:
            output["aux_loss"] = aux
            output["router_logits"] = tuple(record.logits for record in self.records)
            loss = output.get("loss")
            if labels and loss is not None:
                output["loss"] = loss + self.coef * aux.to(loss.dtype)
        return output

    # --- statistics -------------------------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Per expert block of the last forward: ``layer``, ``mod`` (whether a MoD layer fed it its
        kept tokens), ``tokens`` (real tokens its router saw) and ``expert_tokens`` (per expert,
        the real tokens routed to it: each token counts once for each of its top-k experts). A
        router with a no-op expert (`noop-expert`) adds ``noop_slots`` (the slots of the layer's
        real tokens that went to the no-op expert: those its router dropped, and every slot of a
        token the MoD layer sent past the block) and ``noop_fraction`` (their share of all slots)."""
        rows = []
        for record in self.records:
            with torch.no_grad():
                selected, weight = record.assignments(self.top_k)
                counts = torch.bincount(selected.reshape(-1), weights=weight.reshape(-1), minlength=self.num_experts)
                tokens = int(record.valid.sum()) if record.valid is not None else selected.shape[0]
            row = {"layer": record.layer, "mod": record.mod, "tokens": tokens, "expert_tokens": counts.long().tolist()}
            if record.dropped is not None:
                top_k = selected.shape[1]
                passed = self._passed_tokens(record.layer)
                row["noop_slots"] = top_k * (tokens + passed) - int(counts.sum())
                row["noop_fraction"] = row["noop_slots"] / (top_k * (tokens + passed)) if tokens + passed else 0.0
            rows.append(row)
        return rows

    def _passed_tokens(self, layer: int) -> int:
        """The real tokens MoD layer `layer` sent past its routed block in the last forward."""
        state = self.routed.get(layer)
        if state is None or state.last_keep is None:
            return 0
        skipped = ~state.last_keep
        return int((skipped & state.last_real).sum() if state.last_real is not None else skipped.sum())


class _RouterHook:
    def __init__(self, recorder: ExpertRecorder, layer: int):
        self.recorder, self.layer = recorder, layer

    def __call__(self, module, args, output):
        self.recorder.router_called(self.layer, output)


def attach_experts(model: nn.Module, state: Any, stack_owner: nn.Module, stack: nn.ModuleList) -> list:
    """Record the expert routers of a converted MoE model and take over its load-balancing loss;
    the hooks' handles (nothing for a model without experts). The recorder is kept in
    `state.family["experts"]`."""
    spec = router_spec(model)
    if spec is None:
        return []
    targets, index = spec
    config = model.config.get_text_config(decoder=True)
    routers = [(i, m) for i, layer in enumerate(stack) for m in layer.modules() if _is_router(m, targets)]
    if not routers:
        return []
    first = routers[0][1]
    num_experts = (
        getattr(first, "num_experts", None) or getattr(config, "num_local_experts", None) or config.num_experts
    )
    top_k = getattr(first, "top_k", None) or config.num_experts_per_tok
    recorder = ExpertRecorder(
        model,
        state,
        stack,
        index,
        int(num_experts),
        int(top_k),
        float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
    )
    handles = [module.register_forward_hook(_RouterHook(recorder, i)) for i, module in routers]
    handles += [
        stack_owner.register_forward_pre_hook(recorder.before_stack, with_kwargs=True),
        stack_owner.register_forward_hook(recorder.after_stack, with_kwargs=True, always_call=True),
    ]
    if "output_router_logits" in inspect.signature(type(model).forward).parameters:
        handles += [
            model.register_forward_pre_hook(recorder.before_model, with_kwargs=True),
            model.register_forward_hook(recorder.after_model, with_kwargs=True),
        ]
    state.family["experts"] = recorder
    return handles
