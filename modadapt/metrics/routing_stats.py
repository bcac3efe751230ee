"""Per-layer kept fractions of a converted model's last forward, and the expert load of its
mixture-of-experts blocks, for logging."""

from __future__ import annotations

from torch import nn

from ..convert import mod_layers


def routing_stats(model: nn.Module) -> list[dict]:
    """One dict per MoD layer: ``layer``, ``router``, ``kept_tokens``, ``tokens`` and
    ``kept_fraction`` (over real tokens; padding never counts), from the last forward."""
    rows = []
    for layer in mod_layers(model):
        state = layer.mod_state
        row = {"layer": state.index, "router": layer.router.name, "kept_tokens": 0, "tokens": 0, "kept_fraction": None}
        if state.last_keep is not None:
            keep = state.last_keep
            real = state.last_real
            kept = (keep & real).sum() if real is not None else keep.sum()
            total = real.sum() if real is not None else keep.numel()
            row["kept_tokens"], row["tokens"] = int(kept), int(total)
            row["kept_fraction"] = row["kept_tokens"] / row["tokens"] if row["tokens"] else 0.0
        rows.append(row)
    return rows


def expert_stats(model: nn.Module) -> list[dict]:
    """One dict per mixture-of-experts block (Mixtral, Qwen2/3-MoE) of the last forward:
    ``layer``, ``mod`` (whether a MoD layer fed it its kept tokens), ``tokens`` (the real tokens its
    router saw: never padding, never a MoD layer's skipped tokens or filler slots) and
    ``expert_tokens`` (per expert, the tokens routed to it, each once per top-k choice); with
    `noop-expert`, ``noop_slots`` and ``noop_fraction`` (the real tokens' slots that went to the
    no-op expert, those of tokens that skipped the MLP included). Empty for a model without experts."""
    from ..mod_layer import state_of

    mod_layers(model)  # a converted model, or the usual error
    return state_of(model).adapter.expert_stats(model)
