"""Attention masks for the tokens a MoD layer holds.

transformers builds one mask per forward, sized from the first layer's cache; a MoD layer holds
fewer tokens (and, in a batch, different ones per row), so it builds its own from the sequence
indices of its queries and cached keys.
"""

from __future__ import annotations

import torch

from .errors import ModAdaptError

#: The attention probes record q/k and then run SDPA (`attention_probe.PROBE_ATTENTION`: SDPA-style
#: masks) or eager attention (`PROBE_EAGER_ATTENTION`: additive masks).
SUPPORTED_ATTENTION = ("sdpa", "eager", "modadapt_probe", "modadapt_probe_eager")
_EAGER_MASKS = ("eager", "modadapt_probe_eager")


def subset_attention_mask(
    attn_implementation: str,
    *,
    query_index: torch.Tensor,
    query_valid: torch.Tensor | None,
    past_index: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    causal: bool,
    window: int | None,
    span: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Mask `[B, 1, K, P + K]` over (cached keys, new keys) for K new queries, or None.

    None means the layer's own default over the new tokens (causal decoders: SDPA's fused
    `is_causal` path; bidirectional encoders: full attention). It is returned when there is no
    cached key, no filler slot and no window cuts the `span`; and for a single new query when
    every cached key is real (`past_valid` None): it may see them all (the common decode step).
    Each query always sees its own key, so filler queries never have an empty row (no NaN).
    """
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ModAdaptError(
            f"MoD layers run with attn_implementation 'sdpa' or 'eager', not {attn_implementation!r}; "
            "load the model with attn_implementation='sdpa'."
        )
    attn_implementation = "eager" if attn_implementation in _EAGER_MASKS else "sdpa"
    no_window = window is None or span <= window
    B, K = query_index.shape
    plain = past_index is None and query_valid is None and no_window
    if plain and (attn_implementation == "sdpa" or not causal):
        return None
    if K == 1 and past_valid is None and query_valid is None and no_window:
        return None
    if past_index is None:
        key_index, key_valid = query_index, query_valid
    else:
        key_index = torch.cat([past_index, query_index], dim=1)
        if past_valid is None and query_valid is None:
            key_valid = None
        else:
            ones = torch.ones_like(key_index, dtype=torch.bool)
            key_valid = torch.cat(
                [
                    ones[:, : past_index.shape[1]] if past_valid is None else past_valid,
                    ones[:, past_index.shape[1] :] if query_valid is None else query_valid,
                ],
                dim=1,
            )
    allowed = torch.ones(B, K, key_index.shape[1], dtype=torch.bool, device=query_index.device)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if causal:
        allowed = allowed & (key_index[:, None, :] <= query_index[:, :, None])
    if window is not None:
        allowed = allowed & (key_index[:, None, :] > query_index[:, :, None] - window)
    past = key_index.shape[1] - K
    own = torch.zeros(K, key_index.shape[1], dtype=torch.bool, device=query_index.device)
    own[:, past:] = torch.eye(K, dtype=torch.bool, device=query_index.device)
    allowed = (allowed | own)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed
