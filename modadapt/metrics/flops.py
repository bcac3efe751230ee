"""One FLOPs model for every count modadapt reports: recipes, `analyze`, `eval` and the benchmarks.

A layer on `n` tokens costs `2·n·P` for its matrix multiplications (`P`: weights of its linear
layers a token passes through, GPT-2's `Conv1D` included; a mixture of experts counts its router
and the top-k experts' share of the expert weights, as the adapter reports them:
`Adapter.sublayer_weights`) plus `4·n²·W` for attention scores and the weighted sum of
values (`W`: heads × head dim; the whole square, as a dense kernel and torch's flop counter with
eager attention count it). A MoD layer runs that on its kept tokens (`ceil(c·T)` at capacity `c`;
with `ModConfig.scope` 'attention' or 'mlp', only that sublayer's part: `2·n·A + 4·n²·W` for the
attention with its weights `A`, `2·n·M` for the MLP with its weights `M`, the other on all tokens)
plus its router's `2·T·R` scoring of all `T` tokens (`R`: the router's matrix weights); a router
that does more reports it through `Router.extra_flops()`. In a mixture of experts, one of a
token's top-k slots costs `2·X` (`X`: one expert's weights); a router that sends slots to no
expert (`noop-expert`) counts the slots that ran (`kept` then holds `(tokens, slots)` per layer).
A language model's head costs `2·V·D` per token it scores. Norms, activations, softmax and RoPE are left out (a few percent).
`torch.utils.flop_counter` is not used because on CPU it counts fused attention as zero.
"""

from __future__ import annotations

from torch import nn

from ..routers.base import kept_count


def linear_weights(layer: nn.Module) -> int:
    """Number of weights in the layer's linear maps."""
    return sum(
        m.weight.numel()
        for m in layer.modules()
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "weight"))
    )


def attention_width(model: nn.Module, layer: nn.Module) -> int:
    """Heads × head dim of the layer's attention (transformers config, or timm's `attn`)."""
    attn = getattr(layer, "attn", None)
    if attn is not None and hasattr(attn, "num_heads") and hasattr(attn, "head_dim"):
        return int(attn.num_heads) * int(attn.head_dim)
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def processing_flops(tokens: int, weights: int, width: int) -> int:
    """Forward FLOPs of a layer with `weights` linear weights and attention width `width` on
    `tokens` tokens: the formula every count below is made of."""
    return 2 * tokens * weights + 4 * tokens * tokens * width


def routed_layer_flops(row: dict, tokens: int, kept: int | tuple[int, int]) -> int:
    """Forward FLOPs of a MoD layer's work (its router's scoring aside) on `tokens` tokens of which
    it keeps `kept`: the whole layer on them (``scope`` 'block'), or only the routed sublayer
    (``attention`` holds its weights' attention part) and the other on all tokens. `kept` as
    `(tokens, slots)`: the kept tokens ran `slots` of their top-k expert slots in all (a row's
    ``expert`` and ``top_k``: one expert's weights, experts per token), not all of them."""
    kept, slots = kept if isinstance(kept, tuple) else (kept, None)
    unrun = 0 if slots is None else 2 * (kept * row["top_k"] - slots) * row["expert"]
    scope, attention = row.get("scope", "block"), row.get("attention")
    if scope == "block":
        return processing_flops(kept, row["weights"], row["width"]) - unrun
    if attention is None:
        raise ValueError("a layer routed by sublayer needs its attention weights in the table")
    attended = kept if scope == "attention" else tokens
    mlp = 2 * (kept if scope == "mlp" else tokens) * (row["weights"] - attention)
    return processing_flops(attended, attention, row["width"]) + mlp - unrun


def layer_flops(weights: int, width: int, hidden: int, tokens: int, capacity: float | None = None) -> int:
    """Forward FLOPs of one layer on `tokens` tokens; with `capacity`, of its MoD version (a
    linear router of `hidden` weights)."""
    if capacity is None:
        return processing_flops(tokens, weights, width)
    return processing_flops(kept_count(capacity, tokens), weights, width) + 2 * tokens * hidden


def token_weights(adapter, model: nn.Module, layer: nn.Module) -> dict:
    """``weights``: the linear weights one token passes through in `layer` (a MoD router's own
    excluded), and ``attention``: the attention's part of them (None: the adapter does not split
    the layer), from `Adapter.sublayer_weights`, else every linear map of the layer; a mixture
    of experts adds ``expert`` and ``top_k`` (one expert's weights, experts per token)."""
    parts = adapter.sublayer_weights(model, layer) if adapter is not None else None
    if parts is not None:
        experts = {k: parts[k] for k in ("expert", "top_k") if k in parts}
        return {"weights": parts["attention"] + parts["mlp"], "attention": parts["attention"], **experts}
    router = getattr(layer, "router", None)
    weights = linear_weights(layer) - (linear_weights(router) if isinstance(router, nn.Module) else 0)
    return {"weights": weights, "attention": None}


def flops_table(model: nn.Module) -> dict:
    """What `sequence_flops` needs of a (converted or dense) model: per layer the linear weights a
    token passes through (`token_weights`: a router's own excluded; ``attention`` their attention
    part, or None), attention width, its router's matrix weights (None: not converted) and what
    it routes (``scope``: `ModConfig.scope`); the LM head's weights (0 for models without one)."""
    from ..convert import mod_layers
    from ..mod_layer import state_of
    from .layer_stack import analysis_adapter

    routers, scope = {}, "block"
    if state_of(model) is not None:
        scope = state_of(model).config.scope
        for layer in mod_layers(model):
            routers[layer.mod_state.index] = sum(p.numel() for p in layer.router.parameters() if p.dim() >= 2)
    adapter, layers = analysis_adapter(model)
    rows = []
    for index, layer in enumerate(layers):
        rows.append(
            {
                **token_weights(adapter, model, layer),
                "width": attention_width(model, layer),
                "router": routers.get(index),
                "scope": scope if index in routers else "block",
            }
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {"layers": rows, "head": head.weight.numel() if head is not None else 0}


def sequence_flops(
    table: dict, tokens: int, kept: dict[int, int | tuple[int, int]] | None = None, head_tokens: int | None = None
) -> int:
    """Forward FLOPs of one sequence of `tokens` tokens: each layer on `kept[i]` tokens where
    `kept` names it (plus its router's scoring of all tokens; a row's ``scope`` says what it runs
    on them, and `(tokens, expert slots)` how many of their experts they ran:
    `routed_layer_flops`), else on all of them, and the head on `head_tokens` (default: all).
    `kept=None` is the dense model."""
    total = 2 * (tokens if head_tokens is None else head_tokens) * table["head"]
    for index, row in enumerate(table["layers"]):
        routed = kept is not None and index in kept
        total += (
            routed_layer_flops(row, tokens, kept[index])
            if routed
            else processing_flops(tokens, row["weights"], row["width"])
        )
        if routed and row["router"] is not None:
            total += 2 * tokens * row["router"]
    return total


def model_layer_flops(
    model: nn.Module, layers: nn.ModuleList, hidden: int, tokens: int, capacity: float, selected: list[int]
) -> list[dict]:
    """Per layer: ``dense`` FLOPs and ``mod`` FLOPs (equal to dense for layers not selected)."""
    from .layer_stack import analysis_adapter

    adapter = analysis_adapter(model)[0]
    rows = []
    for index, layer in enumerate(layers):
        weights, width = token_weights(adapter, model, layer)["weights"], attention_width(model, layer)
        dense = layer_flops(weights, width, hidden, tokens)
        mod = layer_flops(weights, width, hidden, tokens, capacity) if index in selected else dense
        rows.append({"layer": index, "dense": dense, "mod": mod})
    return rows
