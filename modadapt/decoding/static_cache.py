"""The static, per-row compacted KV cache of a decode step, and the attention that reads it.

A captured CUDA graph needs buffers of fixed size; a MoD layer's rows keep different numbers of
tokens. So each layer holds each row's kept tokens' K/V in slots `[0, length)` of a buffer
`[B, capacity, Hk, d]`, `update` writes a row's new K/V at that row's length, and attention reads
only each row's used slots (flash attention with per-row used lengths on CUDA; elsewhere a
length mask, over buffers that start zeroed). The model family's attention function hands its
query and the buffers to `static_cache_attention`. A decode step feeds one token per row; a
speculative verification (`speculate`) feeds several, written at consecutive slots from the
row's length and attended causally (each sees the slots before it and itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: Name under which the adapter registers the decode step's attention (transformers: `adapters.hf.attention`).
STATIC_ATTENTION = "modadapt_static_decode"
_FLASH: dict[tuple, bool] = {}  # per (device, dtype, head size): whether flash with used lengths ran
_MULTIPROCESSORS: dict[str, int] = {}


@dataclass
class KeyLengths:
    """Passed where the layer expects its attention mask: each row's used cache slots."""

    used: torch.Tensor  # [B] int32: slots holding K/V, the tokens being decoded included
    cu_q: torch.Tensor  # [B + 1] int32 query offsets (`queries` tokens per row)
    cu_k: torch.Tensor  # [B + 1] int32 row starts in the flattened cache (multiples of capacity)
    queries: int = 1  # query tokens per row, the last `queries` of its used slots (causal among them)
    # `cu_q * G` per group size G (filled on first use, in a step's warm-up: captured graphs then
    # read the same tensor): offsets of the GQA-packed decode queries (`static_cache_attention`)
    grouped_cu_q: dict = field(default_factory=dict)

    def mask(self, capacity: int) -> torch.Tensor:
        """`[B, 1, queries, capacity]`: the slots each query reads."""
        slots = torch.arange(capacity, device=self.used.device)
        if self.queries == 1:
            return (slots < self.used[:, None]).view(-1, 1, 1, capacity)
        T = self.queries
        own = self.used[:, None] - T + torch.arange(T, device=self.used.device)  # [B, T]: each query's slot
        return (slots <= own[..., None]).view(-1, 1, T, capacity)


class StaticCache:
    """What the layers' attention sees as `past_key_values`: `update` writes each row's new K/V
    at that row's length in the layer's buffers and returns the whole buffers."""

    def __init__(self, keys: list, values: list, lengths: list):
        self.keys, self.values, self.lengths = keys, values, lengths

    @torch.compiler.disable  # in place into the buffers, eagerly (see `modadapt.decoding.compiled`)
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v, length = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        B, Hk, T, d = key.shape
        if T == 1:
            slot = length.view(B, 1, 1, 1).expand(B, 1, Hk, d)
        else:  # consecutive slots from the row's length
            slot = (length.view(B, 1) + torch.arange(T, device=length.device)).view(B, T, 1, 1).expand(B, T, Hk, d)
        k.scatter_(1, slot, key.transpose(1, 2).to(k.dtype))
        v.scatter_(1, slot, value.transpose(1, 2).to(v.dtype))
        return k, v


def flash_key(query: torch.Tensor) -> tuple:
    """What flash support depends on: the device, the dtype and the head size."""
    return (str(query.device), query.dtype, query.shape[-1])


def flash_available(query: torch.Tensor) -> bool:
    """Whether the flash kernel with per-row used lengths may run (CUDA, half precision, not known to fail)."""
    return (
        query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _FLASH.get(flash_key(query)) is not False
    )


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors: how many blocks fill it once."""
    key = str(device)
    if key not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _MULTIPROCESSORS[key]


def pack_groups(query: torch.Tensor, kv_heads: int) -> bool:
    """Whether one decode token's grouped query heads go to flash packed, G queries per K/V head.
    Packed, flash runs one block per (row, K/V head), each reading its head once for the group;
    per head it runs G times the blocks and splits long K/V across more (split-KV). Measured on
    an H200 (1.1B Llama, 8 K/V heads, 132 SMs; benchmarks/results/decode-attention-h200-2026-12-01.log):
    packed wins only once its blocks fill the device (B = 32, 2k context: 61 vs 72 us; B = 64: 119
    vs 131) and loses badly below (B = 1, 32k context: 580 vs 35 us; B = 8: 576 vs 149)."""
    return query.shape[0] * kv_heads >= multiprocessors(query.device)


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale, used) -> torch.Tensor:
    """Flash attention over packed rows, reading `used[b]` keys of row b (aligned to its end if causal)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, seqused_k=used
    )[0]


@torch.compiler.disable  # flash, its fallback and its `_FLASH` bookkeeping stay eager (a graph break)
def static_cache_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: KeyLengths,
    scale: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """`T = lengths.queries` query tokens per row (`[B, H, T, d]`) against the static cache
    `[B, capacity, Hk, d]`, reading each row's used slots only (causally among the last `T`);
    returns `[B, T, H, d]`.

    One decode token per row with grouped K/V heads (`G = H / Hk > 1`) goes to flash as `G`
    queries per K/V head when that fills the device (`pack_groups`): flash's varlen kernel gives
    every query head its own block, so each block reads its K/V head again (G times the cache's
    bytes); packed, each K/V head is read once for its whole group, but in fewer blocks.

    `softcap` (Gemma 2's attention logits: `cap * tanh(scores / cap)`) has no flash kernel here
    (torch's `_flash_attention_forward` takes none) nor an SDPA one: the scores are computed
    explicitly then, on every device, as the family's eager attention does."""
    B, H, T, d = query.shape
    _, capacity, Hk, _ = key.shape
    G = H // Hk
    flash = flash_key(query)
    if softcap is None and flash_available(query):
        k, v = key.view(B * capacity, Hk, d), value.view(B * capacity, Hk, d)
        try:
            if T == 1 and G > 1 and pack_groups(query, Hk):  # [B, H, 1, d] -> [B * G, Hk, d]: heads as tokens
                q = query.reshape(B, Hk, G, d).transpose(1, 2).reshape(B * G, Hk, d)
                cu = lengths.grouped_cu_q.get(G)
                if cu is None:
                    cu = lengths.grouped_cu_q[G] = lengths.cu_q * G
                out = flash_varlen(q, k, v, cu, lengths.cu_k, G, capacity, False, scale, lengths.used)
                _FLASH[flash] = True
                return out.view(B, G, Hk, d).transpose(1, 2).reshape(B, 1, H, d)
            # Causal in flash's varlen kernel is aligned to each row's end (its used length):
            # query t of a row sees its slots up to `used - T + t`.
            q = query.transpose(1, 2).reshape(B * T, H, d)
            out = flash_varlen(q, k, v, lengths.cu_q, lengths.cu_k, T, capacity, T > 1, scale, lengths.used)
            _FLASH[flash] = True
            return out.view(B, T, H, d)
        except (RuntimeError, TypeError):
            if _FLASH.get(flash):  # it ran before on such tensors: this is a real error
                raise
            _FLASH[flash] = False
    # The query heads of each K/V head go as that head's queries: no repeat_kv copy of the cache.
    mask = lengths.mask(capacity)
    if T == 1:
        q = query.reshape(B, Hk, G, d)
    else:  # queries ordered (head of the group, token): each row of the mask repeated per head
        q = query.reshape(B, Hk, G * T, d)
        mask = mask.unsqueeze(2).expand(B, 1, G, T, capacity).reshape(B, 1, G * T, capacity)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale)
    else:
        scores = q @ key.permute(0, 2, 3, 1) * (scale if scale is not None else d**-0.5)  # [B, Hk, rows, capacity]
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ value.transpose(1, 2)
    if T == 1:
        return out.reshape(B, 1, H, d)
    # reshape: SDPA's CUDA kernels may return a transposed layout that a view cannot take
    return out.reshape(B, H, T, d).transpose(1, 2).contiguous()
