"""Static baseline for integrated MoDE: fewer experts per token, on fixed layers.

Integrated MoDE (`noop-expert`) runs fewer of a token's top-k expert slots, chosen per token. The
static way to run as many is to lower top-k on the same layers: every token keeps its `k - 1` (or
fewer) highest-scoring experts, weighted as the family's router weights its top-k (Mixtral
renormalises them). Removing the least-used experts, the other "expert dropping", saves memory
but not FLOPs: every token still runs `k` experts, so it is no baseline at matched FLOPs.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from modadapt.plugins import find_adapter


def top_k_plan(layers: list[int], top_k: int, share: float) -> dict[int, int]:
    """Per layer of `layers`, the top-k that runs about `share` of the original `top_k` slots:
    `ceil(share * k)` or `floor(share * k)` experts, the lower one on evenly spaced layers, as many
    as bring the mean closest to `share * k`. A layer would need 0 experts: an error."""
    want = share * top_k
    low, high = math.floor(want), math.ceil(want)
    if low < 1:
        raise ValueError(f"a share of {share} of top-{top_k} leaves a layer no expert; use a share >= {1 / top_k}")
    if low == high:
        return {i: low for i in layers}
    count = round((high - want) * len(layers))  # layers at `low`
    chosen = {layers[math.floor((j + 0.5) * len(layers) / count)] for j in range(count)} if count else set()
    return {i: low if i in chosen else high for i in layers}


def reduce_top_k(model: nn.Module, plan: dict[int, int]) -> nn.Module:
    """A copy of the mixture-of-experts LM `model` whose experts' routers at the layers of `plan`
    keep that many experts per token (the attribute the family's router reads; `save_pretrained`
    does not record it, the config keeps the original top-k)."""
    model = copy.deepcopy(model)
    adapter = find_adapter(model)
    _, stack = adapter.layer_stack(model)
    for index, top_k in plan.items():
        mlp, _ = adapter.sublayer_call(model, stack[index], index, "mlp")
        router = adapter.expert_router(model, mlp)
        if router is None:
            raise ValueError(f"layer {index} has no experts' router")
        router.top_k = top_k
        if hasattr(mlp, "top_k"):
            mlp.top_k = top_k
    return model
