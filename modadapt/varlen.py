"""Packed attention: the kept tokens of every row of a batch as one sequence, no padding.

When the rows of a batch keep different numbers of tokens (threshold routers, causal rules), the
padded layout runs every row at the width of the widest, with a `[B, K, K]` mask that keeps SDPA
off its fused causal kernels. Packed, the layer runs on the `N = sum(kept)` tokens as a batch of
one, and attention runs per row ("segment") through a variable-length kernel: the flash kernel of
`torch.nn.attention.varlen` on CUDA, or a per-segment SDPA loop elsewhere (the reference the tests
compare against). Segments are given as cumulative offsets `[B + 1]` (int32), as flash expects.

Transformers layers call their attention through a registered function chosen by the config;
`VARLEN_ATTENTION` names ours, and the adapter switches a layer to it for the packed call only.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .errors import ModAdaptError

#: Name of the transformers attention function that runs packed segments.
VARLEN_ATTENTION = "modadapt_varlen"
#: Keyword arguments a packed layer call passes through to that attention function: the query
#: row offsets, `(max query length, max key length)` bounds, and (with a KV cache) a callable
#: `append(key, value, segments) -> (keys, values, key_segments, has_past)` that stores the new
#: K/V and returns everything to attend (`ModCacheLayer.mod_packed_update`).
SEGMENTS_KWARG = "modadapt_segments"
MAX_LEN_KWARG = "modadapt_max_len"
APPEND_KWARG = "modadapt_append"


def _find_flash_varlen():
    """`(varlen_attn, its parameter names)` when this torch has the flash varlen kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_FLASH_VARLEN = _find_flash_varlen()  # at import: a plain constant for torch.compile to read


def has_fast_kernel(x: torch.Tensor) -> bool:
    """Whether packed attention on tensors like `x` runs a fused kernel (else packing only costs)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _FLASH_VARLEN is not None


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_segments: torch.Tensor,
    k_segments: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None,
    causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention within each segment: query segment i attends key segment i. `query` `[Nq, H, d]`,
    `key`/`value` `[Nk, Hk, d]` with `Hk` dividing `H` (grouped-query attention); returns
    `[Nq, H, d]`. `causal` needs equal query and key segments. `max_q` / `max_k` bound the longest
    segments (upper bounds are fine: they only size the kernel's grid)."""
    if dropout == 0.0 and has_fast_kernel(query):
        kernel, params = _FLASH_VARLEN
        kwargs = {"scale": scale}
        if causal:  # torch versions take either is_causal or window_size=(-1, 0) (2.11: the latter)
            kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
        if key.shape[1] != query.shape[1] and "enable_gqa" in params:
            kwargs["enable_gqa"] = True  # older versions take grouped K/V without the flag (tested on 2.11)
        q_seg, k_seg = q_segments.to(torch.int32), k_segments.to(torch.int32)
        # max_q == 1 with grouped K/V makes flash fold the heads into the batch, which assumes one
        # query in every segment; a decode step leaves the rows that skip with none. 2 is a bound too.
        return kernel(query, key, value, q_seg, k_seg, max(max_q, 2), max_k, **kwargs)
    return _reference(query, key, value, q_segments, k_segments, scale=scale, causal=causal, dropout=dropout)


@torch.compiler.disable  # a host loop over segment lengths: traced, it would specialise on each
def _reference(query, key, value, q_segments, k_segments, *, scale, causal, dropout):
    """Per-segment SDPA: slow (a host sync and a loop), exact; used off CUDA and in tests."""
    q_lengths, k_lengths = q_segments.diff().tolist(), k_segments.diff().tolist()
    outputs = []
    for q, k, v in zip(query.split(q_lengths), key.split(k_lengths), value.split(k_lengths)):
        if not len(q):
            continue
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            dropout_p=dropout, is_causal=causal and len(q) > 1, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs) if outputs else query.new_empty(query.shape)


def transformers_varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The transformers attention function for a packed call: `query` `[1, H, N, d]`, keys and
    values `[1, Hk, N, d]`; returns `([1, N, H, d], None)` like the SDPA function."""
    segments = kwargs.get(SEGMENTS_KWARG)
    if segments is None or query.shape[0] != 1:
        raise ModAdaptError(f"{VARLEN_ATTENTION} attention only runs MoD layers' packed calls.")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ModAdaptError(f"packed MoD attention does not support {name!r}; convert with packing='padded'.")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    k_segments, has_past = segments, False
    append = kwargs.get(APPEND_KWARG)
    if append is not None:
        key, value, k_segments, has_past = append(key, value, segments)
    max_q, max_k = kwargs[MAX_LEN_KWARG]
    out = varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), segments, k_segments,
        max_q, max_k, scale=scaling,
        causal=bool(causal) and not has_past,  # with a past: one new token per row, which sees it all
        dropout=dropout,
    )
    return out[None], None


@functools.cache
def register_transformers_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, transformers_varlen_attention)
