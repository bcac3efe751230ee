"""Packed attention: the kept tokens of every row of a batch as one sequence, no padding.

When the rows of a batch keep different numbers of tokens (threshold routers, causal rules), the
padded layout runs every row at the width of the widest, with a `[B, K, K]` mask that keeps SDPA
off its fused causal kernels. Packed, the layer runs on the `N = sum(kept)` tokens as a batch of
one, and attention runs per row ("segment") through a variable-length kernel: the flash kernel of
`torch.nn.attention.varlen` on CUDA, or a per-segment SDPA loop elsewhere (the reference the tests
compare against). Segments are given as cumulative offsets `[B + 1]` (int32), as flash expects.

A family's layers reach this kernel through their own attention calling convention: for
transformers, the registered attention function of `modadapt.adapters.hf.attention`, which the
adapter switches a layer to for the packed call only (`LayerCall.packed_attention`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "VARLEN_ATTENTION": "modadapt.adapters.hf.attention:VARLEN_ATTENTION",
        "transformers_varlen_attention": "modadapt.adapters.hf.attention:transformers_varlen_attention",
        "register_transformers_attention": "modadapt.adapters.hf.attention:register_attention_functions",
    },
)

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
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            dropout_p=dropout,
            is_causal=causal and len(q) > 1,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs) if outputs else query.new_empty(query.shape)
