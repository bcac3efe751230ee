"""Per-layer forward FLOPs of a dense layer and of its MoD version, by an explicit formula.

For a layer on `T` tokens: `2·T·P` for its matrix multiplications (`P`: weights of its linear
layers, GPT-2's `Conv1D` included) plus `4·T²·W` for attention scores and the weighted sum of values
(`W`: heads × head dim; the full square, as a dense kernel computes it). A MoD layer at capacity
`c` runs the same on `k = ceil(c·T)` tokens plus its router's `2·T·D` scoring. Norms, activations
and softmax are left out (they are a few percent). `torch.utils.flop_counter` is not used because
on CPU it counts fused attention as zero.
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


def layer_flops(weights: int, width: int, hidden: int, tokens: int, capacity: float | None = None) -> int:
    """Forward FLOPs of one layer on `tokens` tokens; with `capacity`, of its MoD version."""
    if capacity is None:
        return 2 * tokens * weights + 4 * tokens * tokens * width
    kept = kept_count(capacity, tokens)
    return 2 * kept * weights + 4 * kept * kept * width + 2 * tokens * hidden


def model_layer_flops(
    model: nn.Module, layers: nn.ModuleList, hidden: int, tokens: int, capacity: float, selected: list[int]
) -> list[dict]:
    """Per layer: ``dense`` FLOPs and ``mod`` FLOPs (equal to dense for layers not selected)."""
    rows = []
    for index, layer in enumerate(layers):
        weights, width = linear_weights(layer), attention_width(model, layer)
        dense = layer_flops(weights, width, hidden, tokens)
        mod = layer_flops(weights, width, hidden, tokens, capacity) if index in selected else dense
        rows.append({"layer": index, "dense": dense, "mod": mod})
    return rows
