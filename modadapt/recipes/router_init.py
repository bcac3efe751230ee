"""Start learned routers from what the dense model does, instead of from zero.

A zero-initialised router scores every token alike, so its first top-k picks are arbitrary, and it
learns only through the tokens it happens to keep. On our 97.5M-parameter benchmark such routers
hardly beat random token choice after 8M tokens of adaptation. `fit_router_scores` instead fits
each router's linear score, by ridge regression on a few dense forwards, to how much its layer
changes each token (the log of `|layer(x) - x| / |x|`): the tokens the layer barely moves score
lowest and are skipped first. One closed-form solve per layer, no gradient steps. A routed
sublayer (`ModConfig.scope` 'attention' or 'mlp') is fitted to what it adds to the residual:
`|f(x)| / |x|`, or with a norm after it (Gemma 2/3, OLMo 2) `|norm(f(x))| / |x|`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..convert import mod_layers
from ..dense import dense
from ..errors import ModAdaptError
from ..mod_layer import _CallArguments
from ..routers.linear_score import LinearScore

RIDGE = 1e-3  # relative to the mean diagonal of X^T X: keeps the solve stable on few tokens


def update_size(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per token, log of how far the layer moves it relative to its size."""
    return relative_size(inputs, outputs.double() - inputs.double())


def relative_size(inputs: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Per token, log of the size of `update` (what is added to the residual) relative to `inputs`."""
    inputs, update = inputs.double(), update.double()
    return torch.log(update.norm(dim=-1) + 1e-12) - torch.log(inputs.norm(dim=-1) + 1e-12)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{layer index: (inputs [N, d], update sizes [N])}` of every MoD layer over `batches`
    (dicts of model inputs; tokens where ``attention_mask`` is 0 are left out), run dense. Each
    layer's real tokens are taken as it runs (float64, on the CPU), so no activations pile up."""
    seen: dict[int, list] = {}
    real: list[torch.Tensor | None] = [None]  # the running batch's attention mask
    pending: dict[int, torch.Tensor] = {}  # a sublayer's input, until the norm after it has run

    def record(index: int, hidden: torch.Tensor, update: torch.Tensor) -> None:
        keep = real[0].bool() if real[0] is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
        keep = keep.to(hidden.device)
        seen.setdefault(index, []).append(
            (hidden[keep].double().cpu(), relative_size(hidden[keep], update[keep]).cpu())
        )

    def hook(layer, args, kwargs, output):
        call = layer.mod_state.call
        hidden = _CallArguments(call, layer, args, kwargs).get(call.hidden)
        out = output[0] if isinstance(output, tuple) else output
        if call.skipped is None:  # a block returns the residual stream
            record(layer.mod_state.index, hidden, out.double() - hidden.double())
        elif call.output_norm is None:  # a sublayer returns what it adds to the residual
            record(layer.mod_state.index, hidden, out)
        else:  # ... which the norm after it normalises first
            pending[layer.mod_state.index] = hidden

    def norm_hook(index: int):
        def after_norm(norm, args, output):
            if index in pending:
                record(index, pending.pop(index), output)

        return after_norm

    handles = []
    for layer in mod_layers(model):
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        norm = layer.mod_state.call.output_norm
        if norm is not None:
            handles.append(norm.register_forward_hook(norm_hook(layer.mod_state.index)))
    try:
        with dense(model):
            for batch in batches:
                real[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {i: (torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])) for i, rows in seen.items()}


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
    """Weights and bias of the least-squares line through (x, y) with a small ridge on the
    centred inputs; scaled so that the fitted scores have unit standard deviation."""
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - mean_y))
    pred = xc @ w
    scale = 1.0 / max(pred.std().item(), 1e-12)
    w = w * scale
    return w, float(-(mean_x @ w))


def fit_router_scores(model: nn.Module, batches: Iterable[dict], ridge: float = RIDGE) -> dict[int, float]:
    """Fit every MoD layer's linear router score to its layer's update sizes on `batches` (see the
    module docstring). Routers without a linear score (attention, random) are left alone; a model
    with none is an error. Returns each fitted layer's correlation between score and target."""
    layers = [layer for layer in mod_layers(model) if isinstance(getattr(layer.router, "scorer", None), LinearScore)]
    if not layers:
        raise ModAdaptError(
            "router_init=update-size needs routers with a learned linear score (topk, threshold-p); "
            "this model's routers have none."
        )
    data = collect(model, batches)
    fitted = {}
    for layer in layers:
        x, y = data[layer.mod_state.index]
        w, b = ridge_fit(x, y, ridge)
        scorer = layer.router.scorer
        scorer.weight.data.copy_(w.to(scorer.weight.dtype).view_as(scorer.weight))
        scorer.bias.data.fill_(b)
        score = x @ w + b
        fitted[layer.mod_state.index] = float(torch.corrcoef(torch.stack([score, y]))[0, 1]) if len(y) > 1 else math.nan
    return fitted
