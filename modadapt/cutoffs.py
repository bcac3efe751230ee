"""Calibrated causal cut-offs set for the routing inference uses, after training.

Training records each MoD layer's cut-off from its top-k selection, on inputs that the layers
before it produced with top-k too. Evaluation and decoding route every layer by its causal rule
instead, so the inputs of a later layer, and the share its cut-off keeps, shift: on the quality
benchmark a middle layer kept 12.9% of the tokens at capacity 16.8%, and the model ran below the
FLOPs it was trained for. `calibrate_cutoffs` sets the cut-offs in stack order, each from the
inputs the layers before it (already set) give under the causal rule, so that every layer keeps
its capacity of the calibration tokens as inference routes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .convert import mod_layers
from .errors import ModAdaptError
from .metrics.calibration import Batch, device_batches, evaluating, run_model
from .mod_layer import state_of
from .routers.base import Router, topk_boundary


def calibrates(router: Router) -> bool:
    """Whether `router`'s causal rule thresholds a calibrated cut-off (not one the user fixed,
    not at capacity 1, where nothing is skipped)."""
    if not router.causal_cutoff:
        return False
    argument, _ = router.causal_cutoff
    return router.options[argument] is None and router.capacity < 1.0


def calibrate_cutoffs(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    runner: nn.Module | None = None,
    progress: bool = False,
) -> dict[int, float]:
    """Set the calibrated causal cut-off of every MoD layer that has one, layer by layer in stack
    order, to the value that keeps the router's capacity of the routed tokens in `batches`
    (token tensors or dicts of model inputs), every layer before it routing by its causal rule.
    Returns each layer's new cut-off. One pass over `batches` per layer, in eval mode.

    `runner` (optional: a wrapper that holds `model`, e.g. FSDP's) is what is called. Processes
    given the same batches set the same cut-offs. Layers with a cut-off the user fixed keep it."""
    state = state_of(model)
    if state is None:
        raise ModAdaptError("calibrate_cutoffs: this model is not converted; call modadapt.convert(model, ...) first.")
    targets = [(layer.mod_state.index, layer.router) for layer in mod_layers(model) if calibrates(layer.router)]
    if not targets:
        raise ModAdaptError(
            f"calibrate_cutoffs: no MoD layer has a calibrated causal cut-off (router {state.config.router!r}, "
            f"capacity {state.config.capacity}; a fixed cut-off or a threshold router needs none)."
        )
    batches = list(batches)
    if not batches:
        raise ModAdaptError("calibrate_cutoffs: no calibration batches given.")
    call = model if runner is None else runner
    found: dict[int, float] = {}
    routers = [router for _, router in targets]
    with evaluating(call), _causal_inference(state), cutoffs_restored(routers, on_error_only=True):
        for index, router in targets:
            values, eligible = _collect(model, call, router, index, batches, progress)
            if not values:
                raise ModAdaptError(
                    f"calibrate_cutoffs: layer {index} made no causal decision on the batches (a model "
                    "that attends both ways keeps its top-k selection at inference: nothing to calibrate)."
                )
            cut = topk_boundary(torch.cat(values), router.capacity, torch.cat(eligible))
            if torch.isnan(cut):
                raise ModAdaptError(f"calibrate_cutoffs: layer {index} saw no routed token in the batches.")
            router.set_cutoff(index, cut)
            found[index] = float(cut)
    return found


def _collect(model, call, router: Router, index: int, batches: list, progress: bool) -> tuple[list, list]:
    """Layer `index`'s cut-off statistics and eligibility over `batches` (flattened per batch)."""
    values, eligible = [], []

    def probe(layer_index: int, v: torch.Tensor, e: torch.Tensor) -> None:
        if layer_index == index:  # a shared router serves other layers too
            values.append(v.reshape(-1))
            eligible.append(e.reshape(-1))

    router.cutoff_probe = probe
    try:
        for batch in device_batches(model, batches, progress=progress, desc=f"cut-off of layer {index}"):
            run_model(call, batch)
    finally:
        router.cutoff_probe = None
    return values, eligible


@contextlib.contextmanager
def cutoffs_restored(routers: Iterable[Router], *, on_error_only: bool = False) -> Iterator[None]:
    """The calibrated cut-offs of `routers` as they were, back on exit (to measure other ones), or
    with `on_error_only` only after a failure (so that one part-way leaves none of them set)."""
    saved = [(r, r.calibrated_threshold.clone(), r.calibration_steps.clone()) for r in dict.fromkeys(routers)]

    def restore() -> None:
        with torch.no_grad():
            for router, threshold, steps in saved:
                router.calibrated_threshold.copy_(threshold)
                router.calibration_steps.copy_(steps)

    try:
        yield
    except BaseException:
        restore()
        raise
    if not on_error_only:
        restore()


@contextlib.contextmanager
def _causal_inference(state) -> Iterator[None]:
    """Route by the causal rules in eval mode for the duration (a model converted with
    `inference_routing='topk'` still decodes by them: they are what the cut-offs serve), with
    exact packed counts (a `pack_reserve` pass that overflowed would run again: its statistics
    would count twice)."""
    before = state.config.inference_routing, state.pack_exact
    state.config.inference_routing, state.pack_exact = "causal", True
    try:
        yield
    finally:
        state.config.inference_routing, state.pack_exact = before
        for layer in state.layers:  # new cut-offs keep other shares: `pack_reserve="auto"` learns afresh
            layer.reserve_share = None
