"""Cosine redundancy: how little a layer changes its tokens (a cheaper second opinion to ARank).

Per sample, the mean over real tokens of `cos(h_in, h_out)` between the hidden state entering a
layer and the one leaving it. High similarity means the layer barely moves the residual stream,
so skipping tokens there costs little. One forward pass, no attention maps, any kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModAdaptError
from .calibration import Batch, device_batches, evaluating, padding_mask_of, run_model, summarize
from .layer_stack import find_layers


def token_cosine(before: torch.Tensor, after: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]` mean over real tokens of the cosine similarity of `[B, T, D]` hidden states."""
    cos = F.cosine_similarity(before.float(), after.float(), dim=-1)
    if padding_mask is None:
        return cos.mean(dim=1)
    real = padding_mask.to(cos.device, torch.float32)
    return (cos * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "x"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise ModAdaptError("could not find the hidden states a layer was called with.")


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_cosines(model: nn.Module, batches: Iterable[Batch], *, progress: bool = False) -> list[dict]:
    """Per-layer mean and std over samples of input/output cosine similarity (real tokens only).

    Returns one dict per layer with ``layer``, ``mean``, ``std`` (``normalized_*`` are None:
    the metric is already scale-free).
    """
    layers = find_layers(model)
    values: list[list[torch.Tensor]] = [[] for _ in layers]
    current: dict = {}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            values[index].append(token_cosine(_hidden_in(args, kwargs), _hidden_out(output), current["mask"]).cpu())

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with evaluating(model):
            for batch in device_batches(model, batches, progress=progress, desc="cosine"):
                current["mask"] = padding_mask_of(batch)
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if not values[0]:
        raise ModAdaptError("no calibration batch was given.")
    return [summarize(i, torch.cat(v), None) for i, v in enumerate(values)]
