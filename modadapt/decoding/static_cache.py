"""The static, per-row compacted KV cache of a decode step, and the attention that reads it.

A captured CUDA graph needs buffers of fixed size; a MoD layer's rows keep different numbers of
tokens. So each layer holds each row's kept tokens' K/V in slots `[0, length)` of a buffer
`[B, capacity, Hk, d]`, `update` writes a row's new K/V at that row's length, and attention reads
only each row's used slots (flash attention with per-row used lengths on CUDA; elsewhere a
length mask, over buffers that start zeroed). The model family's attention function hands its
query and the buffers to `static_cache_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Name under which the adapter registers the decode step's attention (transformers: `adapters.hf.attention`).
STATIC_ATTENTION = "modadapt_static_decode"
_FLASH: dict[tuple, bool] = {}  # per (device, dtype, head size): whether flash with used lengths ran


@dataclass
class KeyLengths:
    """Passed where the layer expects its attention mask: each row's used cache slots."""

    used: torch.Tensor  # [B] int32: slots holding K/V, the token being decoded included
    cu_q: torch.Tensor  # [B + 1] int32 query offsets (one token per row)
    cu_k: torch.Tensor  # [B + 1] int32 row starts in the flattened cache (multiples of capacity)

    def mask(self, capacity: int) -> torch.Tensor:
        slots = torch.arange(capacity, device=self.used.device)
        return (slots < self.used[:, None]).view(-1, 1, 1, capacity)


class StaticCache:
    """What the layers' attention sees as `past_key_values`: `update` writes each row's new K/V
    at that row's length in the layer's buffers and returns the whole buffers."""

    def __init__(self, keys: list, values: list, lengths: list):
        self.keys, self.values, self.lengths = keys, values, lengths

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v, length = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        B, Hk, _, d = key.shape
        slot = length.view(B, 1, 1, 1).expand(B, 1, Hk, d)
        k.scatter_(1, slot, key.transpose(1, 2).to(k.dtype))
        v.scatter_(1, slot, value.transpose(1, 2).to(v.dtype))
        return k, v


def flash_key(query: torch.Tensor) -> tuple:
    """What flash support depends on: the device, the dtype and the head size."""
    return (str(query.device), query.dtype, query.shape[-1])


def static_cache_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: KeyLengths,
                           scale: float | None) -> torch.Tensor:
    """One query token per row (`[B, H, 1, d]`) against the static cache `[B, capacity, Hk, d]`,
    reading each row's used slots only; returns `[B, 1, H, d]`."""
    B, H, _, d = query.shape
    _, capacity, Hk, _ = key.shape
    q = query.transpose(1, 2).reshape(B, H, d)
    flash = flash_key(query)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _FLASH.get(flash) is not False:
        try:
            out = torch.ops.aten._flash_attention_forward(
                q, key.view(B * capacity, Hk, d), value.view(B * capacity, Hk, d), lengths.cu_q, lengths.cu_k,
                1, capacity, 0.0, False, False, scale=scale, seqused_k=lengths.used,
            )[0]
            _FLASH[flash] = True
            return out.view(B, 1, H, d)
        except (RuntimeError, TypeError):
            if _FLASH.get(flash):  # it ran before on such tensors: this is a real error
                raise
            _FLASH[flash] = False
    # The query heads of each K/V head go as that head's queries: no repeat_kv copy of the cache.
    out = F.scaled_dot_product_attention(
        q.view(B, Hk, H // Hk, d), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=lengths.mask(capacity), scale=scale,
    )
    return out.reshape(B, 1, H, d)
