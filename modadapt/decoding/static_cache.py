"""The static, per-row compacted KV cache of a decode step, and the attention that reads it.

A captured CUDA graph needs buffers of fixed size; a MoD layer's rows keep different numbers of
tokens. So each layer holds each row's kept tokens' K/V in slots `[0, length)` of a buffer
`[B, capacity, Hk, d]`, `update` writes a row's new K/V at that row's length, and attention reads
only each row's used slots (on CUDA the split-KV kernel of `split_kv` for one token per row, flash
attention with per-row used lengths for several; elsewhere a
length mask, over buffers that start zeroed). The model family's attention function hands its
query and the buffers to `static_cache_attention`. A decode step feeds one token per row; a
speculative verification (`speculate`) feeds several, written at consecutive slots from the
row's length and attended causally (each sees the slots before it and itself).

A gathered call (`branches="gather"`, `step`) runs a MoD layer on only some of the batch's rows,
packed into a smaller batch: `KeyLengths.rows` names the cache row each of its rows reads, and
`GatheredCache` writes each row's new K/V at a flat slot (`row * capacity + length`) computed
before the call. The buffers stay `[B, capacity, Hk, d]`; nothing of the cache is copied.

A sliding-window layer (`KeyLengths.window`): a query at position `p` sees the keys at positions
`> p - window` (transformers' convention, every family). A MoD layer skips tokens, so its slot
index is not a position: such a layer keeps each slot's position beside its K/V
(`StaticCache.slot_positions`, written by `update`); a dense layer holds every token, slot `s` at position
`s`. A row's positions increase along its slots, so the keys in the window are a suffix
`[start, used)` of its used slots: a decode token reads only those (flash from `row * capacity +
start`, `used - start` keys); the mask path, and the several queries of a verification (each with
its own start), mask by position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ModAdaptError
from . import kv_write, split_kv
from .fallback import tried

#: Name under which the adapter registers the decode step's attention (transformers: `adapters.hf.attention`).
STATIC_ATTENTION = "modadapt_static_decode"
#: One decode token per row: `"split-kv"` reads the cache with `split_kv.decode_attention` where it
#: runs (Triton on CUDA), else flash; `"flash"` always flash (the previous kernel, for comparison).
DECODE_KERNEL = "split-kv"
DECODE_KERNELS = ("split-kv", "flash")
# Per (device, dtype, head size): whether a kernel ran on such tensors (True) or raised the first
# time (False: the next path from then on). See `fallback.tried`.
_FLASH: dict[tuple, bool] = {}  # flash with used lengths
_SPLIT_KV: dict[tuple, bool] = {}  # `split_kv.decode_attention`
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
    window: int | None = None  # the layer's sliding window: a query at p sees keys at positions > p - window
    positions: torch.Tensor | None = None  # [B, queries] the queries' positions (read with a window)
    # [B, capacity] each slot's position (None: slot s holds position s); a gathered call's are
    # the whole cache's, read at `rows`
    slot_positions: torch.Tensor | None = None
    # (cu_k, used) of the keys in a decode token's window, made on first use (layers that share
    # these lengths share them too)
    windowed: tuple | None = None
    # A gathered call: `[n]` int64, the cache row each of the call's n rows reads (`cu_k` then
    # holds `rows * capacity`); None: row b reads row b.
    rows: torch.Tensor | None = None
    # How many rows are expected to read (a MoD layer at batch, whose skipping rows' `used` is 0:
    # `step.expected_readers`); None: every row. Tunes the split-KV kernel's chunks only.
    readers: int | None = None

    def mask(self, capacity: int) -> torch.Tensor:
        """`[B, 1, queries, capacity]`: the slots each query reads."""
        slots = torch.arange(capacity, device=self.used.device)
        T = self.queries
        if T == 1:
            sees = (slots < self.used[:, None]).view(-1, 1, capacity)
        else:
            own = self.used[:, None] - T + torch.arange(T, device=self.used.device)  # [B, T]: each query's slot
            sees = slots <= own[..., None]
        if self.window is not None:
            held = self.held_positions()
            held = slots if held is None else held[:, None, :]
            sees = sees & (held > self.positions[..., None] - self.window)
        return sees.view(-1, 1, T, capacity)

    def held_positions(self) -> torch.Tensor | None:
        """`[B, capacity]`: the position of each slot of the rows the queries read (a gathered
        call's rows of the whole cache's), or None: slot s holds position s."""
        held = self.slot_positions
        return held if held is None or self.rows is None else held.index_select(0, self.rows)

    def window_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_k, used) of the keys in the window of a decode token (`queries == 1`): each row's
        slots `[start, used)`, `start` the count of its used slots at positions `<= p - window`."""
        if self.windowed is None:
            gone = self.positions[:, -1] - self.window  # keys at positions <= gone are out of the window
            held = self.held_positions()
            if held is None:  # slot s holds position s
                start = (gone + 1).clamp_min(0)
            else:
                used = torch.arange(held.shape[1], device=self.used.device) < self.used[:, None]
                start = ((held <= gone[:, None]) & used).sum(-1)
            start = torch.minimum(start.to(self.used.dtype), self.used)
            self.windowed = (torch.cat([self.cu_k[:-1] + start, self.cu_k[-1:]]), self.used - start)
        return self.windowed


class StaticCache:
    """What the layers' attention sees as `past_key_values`: `update` writes each row's new K/V
    at that row's length in the layer's buffers and returns the whole buffers. `slot_positions`
    holds, per layer, the position of each slot (`[B, capacity]`, a windowed MoD layer's) or
    None; `update` writes there the `positions` (`[B, T]`) of the tokens it writes."""

    def __init__(self, keys: list, values: list, lengths: list, slot_positions: list | None = None, positions=None):
        self.keys, self.values, self.lengths = keys, values, lengths
        self.slot_positions = slot_positions if slot_positions is not None else [None] * len(keys)
        self.positions = positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced: inductor fuses the write into the K/V's producers
            return self._traced_update(key, value, layer_idx)
        return self._eager_update(key, value, layer_idx)

    def _traced_update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
        """`update` as graph ops, for `torch.compile`: index writes into the buffers (graph inputs,
        which inductor writes in place) that inductor computes in the kernel of what they write (the
        key's rotary, the value's split sum), so the write costs no kernel of its own. The slots must
        fit, as the eager `scatter_` requires: a decoder sizes each buffer for every step it allows
        (and reading a buffer's old contents here, to leave a slot past it alone, would make inductor
        compute the new K/V in a kernel apart)."""
        k, v, length = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        B, Hk, T, d = key.shape
        rows = torch.arange(B, device=length.device).view(B, 1)
        at = length.view(B, 1) + torch.arange(T, device=length.device) if T > 1 else length.view(B, 1)
        k[rows, at] = key.transpose(1, 2).to(k.dtype)  # [B, T, Hk, d] at [B, T] slots
        v[rows, at] = value.transpose(1, 2).to(v.dtype)
        held = self.slot_positions[layer_idx]
        if held is not None:
            held[rows, at] = self.positions.expand(B, T)
        return k, v

    @torch.compiler.disable  # in place into the buffers, eagerly (see `modadapt.decoding.compiled`)
    def _eager_update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int):
        k, v, length = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        B, Hk, T, d = key.shape
        if T == 1:
            at = length.view(B, 1)
        else:  # consecutive slots from the row's length
            at = length.view(B, 1) + torch.arange(T, device=length.device)
        # one token per row: K and V in one kernel where it runs (`kv_write`), else two scatters
        if not (T == 1 and kv_write.available(key, k) and kv_write.write(k, v, key, value, length)):
            slot = at.view(B, T, 1, 1).expand(B, T, Hk, d)
            k.scatter_(1, slot, key.transpose(1, 2).to(k.dtype))
            v.scatter_(1, slot, value.transpose(1, 2).to(v.dtype))
        held = self.slot_positions[layer_idx]
        if held is not None:
            held.scatter_(1, at, self.positions.expand(B, T))
        return k, v


class GatheredCache(StaticCache):
    """The cache a gathered call sees: `update` writes row j's new K/V (one token) at flat slot
    `slots[j]` (`row * capacity + length`, distinct per row) of the layer's buffers and returns the
    whole buffers, which the attention reads through `KeyLengths.rows`; a windowed MoD layer's
    slot positions get the rows' `positions` (`[n, 1]`) there too."""

    def __init__(self, keys: list, values: list, slots: torch.Tensor, slot_positions=None, positions=None):
        super().__init__(keys, values, [], slot_positions, positions)
        self.slots = slots

    @torch.compiler.disable
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows, capacity, Hk, d = k.shape
        if key.shape[2] != 1:
            raise ModAdaptError(f"a gathered call decodes one token per row, got {key.shape[2]}")
        k.view(rows * capacity, Hk, d).index_copy_(0, self.slots, key[:, :, 0].to(k.dtype))
        v.view(rows * capacity, Hk, d).index_copy_(0, self.slots, value[:, :, 0].to(v.dtype))
        held = self.slot_positions[layer_idx]
        if held is not None:
            held.view(-1).index_copy_(0, self.slots, self.positions.view(-1))
        return k, v


def flash_key(query: torch.Tensor) -> tuple:
    """What a kernel's running depends on (flash's and the split-KV kernel's): the device, the
    dtype and the head size."""
    return (str(query.device), query.dtype, query.shape[-1])


def split_kv_available(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the split-KV kernel reads this one-token query's cache: chosen (`DECODE_KERNEL`),
    able to (`split_kv.available`), not known to fail on such tensors."""
    return (
        DECODE_KERNEL == "split-kv" and split_kv.available(query, key) and _SPLIT_KV.get(flash_key(query)) is not False
    )


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


def _flash_decode(query, k, v, lengths: KeyLengths, cu_k, used, capacity: int, scale) -> torch.Tensor:
    """Flash with used lengths over the flattened cache `k`, `v` (`[slots, Hk, d]`); `[B, T, H, d]`."""
    B, H, T, d = query.shape
    Hk = k.shape[1]
    G = H // Hk
    if T == 1 and G > 1 and pack_groups(query, Hk):  # [B, H, 1, d] -> [B * G, Hk, d]: heads as tokens
        q = query.reshape(B, Hk, G, d).transpose(1, 2).reshape(B * G, Hk, d)
        cu = lengths.grouped_cu_q.get(G)
        if cu is None:
            cu = lengths.grouped_cu_q[G] = lengths.cu_q * G
        out = flash_varlen(q, k, v, cu, cu_k, G, capacity, False, scale, used)
        return out.view(B, G, Hk, d).transpose(1, 2).reshape(B, 1, H, d)
    # Causal in flash's varlen kernel is aligned to each row's end (its used length):
    # query t of a row sees its slots up to `used - T + t`.
    q = query.transpose(1, 2).reshape(B * T, H, d)
    return flash_varlen(q, k, v, lengths.cu_q, cu_k, T, capacity, T > 1, scale, used).view(B, T, H, d)


@torch.compiler.disable  # the kernels, their fallback and their bookkeeping stay eager (a graph break)
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
    returns `[B, T, H, d]`. With `lengths.rows` (a gathered call) the query's n rows read cache
    rows `rows` of a cache of any batch: flash through `cu_k` (`rows * capacity`, what the caller
    put there), the fallback through a copy of those rows.

    One decode token per row goes to the split-KV kernel (`split_kv`, `DECODE_KERNEL`) where it
    runs. Otherwise, one decode token per row with grouped K/V heads (`G = H / Hk > 1`) goes to flash as `G`
    queries per K/V head when that fills the device (`pack_groups`): flash's varlen kernel gives
    every query head its own block, so each block reads its K/V head again (G times the cache's
    bytes); packed, each K/V head is read once for its whole group, but in fewer blocks.

    `softcap` (Gemma 2's attention logits: `cap * tanh(scores / cap)`) has no flash kernel here
    (torch's `_flash_attention_forward` takes none) nor an SDPA one: the scores are computed
    explicitly then, on every device, as the family's eager attention does.

    With a sliding window (`lengths.window`) a decode token reads flash from its window's first
    slot (`KeyLengths.window_keys`); several queries per row (a verification: each has its own
    window start, which one row offset cannot say) take the mask path."""
    B, H, T, d = query.shape
    cache_rows, capacity, Hk, _ = key.shape
    G = H // Hk
    kernels = flash_key(query)
    if softcap is None and (lengths.window is None or T == 1):  # a kernel reading the used slots
        k, v = key.view(cache_rows * capacity, Hk, d), value.view(cache_rows * capacity, Hk, d)
        cu_k, used = (lengths.cu_k, lengths.used) if lengths.window is None else lengths.window_keys()
        if T == 1 and split_kv_available(query, key):
            sms = multiprocessors(query.device) if query.is_cuda else 1
            args = (query[:, :, 0], k, v, cu_k, used, scale, capacity, sms)
            call = functools.partial(split_kv.decode_attention, *args, readers=lengths.readers)
            out = tried(_SPLIT_KV, kernels, (Exception,), call)  # Triton's compile and resource errors
            if out is not None:
                return out.view(B, 1, H, d)
        if flash_available(query):
            call = functools.partial(_flash_decode, query, k, v, lengths, cu_k, used, capacity, scale)
            out = tried(_FLASH, kernels, (RuntimeError, TypeError), call)
            if out is not None:
                return out
    if lengths.rows is not None:  # a gathered call: the rows it reads, as a batch of its own
        key, value = key.index_select(0, lengths.rows), value.index_select(0, lengths.rows)
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
