"""Per-layer KV bookkeeping for MoD layers.

A MoD layer writes K/V only for the tokens it processes, so its cache holds fewer entries than a
dense layer's, and in a batch the rows may disagree. Beside K/V, the layer's cache keeps, for
every slot, the sequence index of the token it holds and whether the slot is real (rows that kept
fewer tokens than the widest row have filler slots that nobody attends to). The masks of later
calls are built from this. The bookkeeping lives in the transformers cache layer itself (its class
is swapped for a cached subclass, as for decoder layers), so beam reordering, batch selection and
cropping move it together with K/V.

Two layouts: *rows* (`[B, Hk, L, d]`, as transformers stores it, with filler slots where rows
hold fewer tokens than the widest) and *packed* (`[1, Hk, N, d]`: every row's real slots one row
after another, with `mod_segments` `[B + 1]` row offsets, as `modadapt.varlen` attends them). A
packed prefill starts a cache packed and packed decode steps keep it so (no filler: skipped
tokens take no bytes); anything else (a padded call, beam reordering, cropping) first converts it
to rows (`mod_as_rows`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...errors import ModAdaptError

_CLASSES: dict[type, type] = {}


def _rows_view(name: str, doc: str) -> property:
    """The bookkeeping tensor stored as `name`, read in the rows layout (pending positions are
    recorded and a packed cache is converted first); set as is."""

    def get(self):
        self._mod_flush()
        self.mod_as_rows()
        return getattr(self, name)

    def set(self, value):
        setattr(self, name, value)

    return property(get, set, doc=doc)


def _with_bookkeeping(base: type) -> type:
    """A subclass of a cache layer class that keeps the bookkeeping in step with every cache
    operation. Single inheritance, so an existing object's `__class__` can be swapped in place."""

    class ModCacheLayer(base):
        mod_seen: int  # tokens that reached this layer so far (processed or skipped)
        mod_all_valid: bool  # no filler slot is stored: masks may skip the validity check

        def mod_reset_book(self) -> None:
            self._mod_index = None  # [B, L] sequence index of each cached slot (packed: [1, N])
            self._mod_valid = None  # [B, L] False for filler slots (packed: None)
            self.mod_segments = None  # [B + 1] int32 row offsets while the layout is packed
            self._mod_pending: list[int] = []  # positions appended by `mod_append`, not yet in _mod_index
            self.mod_seen = 0
            self.mod_all_valid = True

        mod_index = _rows_view("_mod_index", "`[B, L]` sequence index of each cached slot")
        mod_valid = _rows_view("_mod_valid", "`[B, L]` bool, False for filler slots")

        def mod_past(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            return self.mod_index, self.mod_valid

        def mod_append(self, position: int) -> None:
            """Record one real slot of a batch of one at sequence index `position`, as a Python
            int: the decode fast path launches no kernel for it; tensors are built when read."""
            self._mod_pending.append(position)

        def _mod_flush(self) -> None:
            if self._mod_pending:
                pending, self._mod_pending = self._mod_pending, []
                self.mod_record(torch.tensor([pending], device=self.keys.device), None)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            """A sliding layer keeps every slot here: transformers would keep the last `window - 1`
            slots, but a MoD row's last slots may be filler, and its keys in reach older ones.
            `mod_advance` drops the slots out of reach by their sequence index instead."""
            if not getattr(self, "is_sliding", False):
                return super().update(key_states, value_states, *args, **kwargs)
            self.cumulative_length += key_states.shape[-2]
            return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)

        def mod_advance(self, tokens: int) -> None:
            """`tokens` more tokens reached the layer; a sliding layer forgets the leading slots no
            later query can see (sequence index `<= mod_seen - window` in every row)."""
            self.mod_seen += tokens
            if not getattr(self, "is_sliding", False) or self.mod_index is None:
                return
            in_reach = (self.mod_index > self.mod_seen - self.sliding_window) & self.mod_valid
            # Each row's real slots are in sequence order: every slot after a row's first one in reach is too.
            first = in_reach.any(0).nonzero()
            start = int(first[0]) if first.numel() else in_reach.shape[1]
            if start:
                self.keys, self.values = self.keys[..., start:, :], self.values[..., start:, :]
                self.mod_index, self.mod_valid = self.mod_index[:, start:], self.mod_valid[:, start:]

        def mod_record(self, index: torch.Tensor, valid: torch.Tensor | None) -> None:
            """Append the slots just written (`valid` None: all real), aligned with the stored K/V."""
            if valid is None:
                valid = torch.ones_like(index, dtype=torch.bool)
            else:
                self.mod_all_valid = False
            if self.mod_index is None:
                self.mod_index, self.mod_valid = index, valid
            else:
                self.mod_index = torch.cat([self.mod_index, index], dim=1)
                self.mod_valid = torch.cat([self.mod_valid, valid], dim=1)
            stored = self.keys.shape[-2]
            if self.mod_index.shape[1] != stored:
                self.mod_index = self.mod_index[:, -stored:]
                self.mod_valid = self.mod_valid[:, -stored:]

        def mod_packed_update(
            self, key: torch.Tensor, value: torch.Tensor, segments: torch.Tensor, positions: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
            """Add a packed call's K/V (`[1, Hk, n, d]`, row offsets `segments`, sequence indices
            `positions` `[n]`) to a cache that is empty or packed (`mod_can_pack`). Returns the
            whole packed K/V, its row offsets, and whether it holds earlier tokens (then each
            row's new tokens come after them: the packed decode step, one token per kept row)."""
            if self._mod_index is None and not self._mod_pending:
                self.update(key, value)
                self.mod_segments, self._mod_index, self._mod_valid = segments, positions[None], None
                return key, value, segments, False
            past = self.mod_segments.long()
            new = segments.long()
            merged = past + new  # each row's offset moves by the new tokens of the rows before it
            N, n, B = self.keys.shape[-2], key.shape[-2], len(past) - 1
            old_rows = torch.repeat_interleave(torch.arange(B, device=key.device), past.diff(), output_size=N)
            old_to = torch.arange(N, device=key.device) + new[old_rows]
            new_rows = torch.repeat_interleave(torch.arange(B, device=key.device), new.diff(), output_size=n)
            new_to = past[new_rows + 1] + torch.arange(n, device=key.device)  # after the row's old slots

            def merge(old: torch.Tensor, fresh: torch.Tensor, dim: int) -> torch.Tensor:
                shape = list(old.shape)
                shape[dim] = N + n
                out = old.new_empty(shape)
                return out.index_copy_(dim, old_to, old).index_copy_(dim, new_to, fresh)

            self.keys, self.values = merge(self.keys, key, -2), merge(self.values, value, -2)
            self._mod_index = merge(self._mod_index, positions[None], 1)
            self.mod_segments = merged.to(torch.int32)
            return self.keys, self.values, self.mod_segments, True

        def mod_can_pack(self, tokens: int) -> bool:
            """Whether a packed call of `tokens` new tokens per row may use this cache: an empty one
            (a prefill), or a packed one for a one-token step. Sliding layers trim along the
            sequence axis, which the packed layout does not have."""
            if getattr(self, "is_sliding", False):
                return False
            if self._mod_index is None and not self._mod_pending:
                return self.mod_seen == 0
            return self.mod_segments is not None and tokens == 1

        def mod_as_rows(self) -> None:
            """Convert a packed cache to the rows layout: row b's slots first, filler after."""
            if self.mod_segments is None:
                return
            segments, self.mod_segments = self.mod_segments.long(), None
            counts = segments.diff()
            B, N = len(counts), self.keys.shape[-2]
            widest, fewest = torch.stack([counts.max(), counts.min()]).tolist()
            rows = torch.repeat_interleave(torch.arange(B, device=counts.device), counts, output_size=N)
            slots = torch.arange(N, device=counts.device) - segments[rows]

            def spread(packed: torch.Tensor) -> torch.Tensor:
                out = packed.new_zeros(B, packed.shape[1], widest, *packed.shape[3:])
                out[rows, :, slots] = packed[0].transpose(0, 1)
                return out

            self.keys, self.values = spread(self.keys), spread(self.values)
            index = torch.zeros(B, widest, dtype=torch.long, device=counts.device)
            index[rows, slots] = self._mod_index[0]
            self._mod_index = index
            self._mod_valid = torch.arange(widest, device=counts.device) < counts[:, None]
            self.mod_all_valid = self.mod_all_valid and widest == fewest

        def reset(self) -> None:
            super().reset()
            self.mod_reset_book()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.mod_as_rows()
            super().reorder_cache(beam_idx)
            if self.mod_index is not None:
                self.mod_index = self.mod_index.index_select(0, beam_idx.to(self.mod_index.device))
                self.mod_valid = self.mod_valid.index_select(0, beam_idx.to(self.mod_valid.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.mod_as_rows()
            super().batch_repeat_interleave(repeats)
            if self.mod_index is not None:
                self.mod_index = self.mod_index.repeat_interleave(repeats, dim=0)
                self.mod_valid = self.mod_valid.repeat_interleave(repeats, dim=0)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.mod_as_rows()
            super().batch_select_indices(indices)
            if self.mod_index is not None:
                self.mod_index = self.mod_index[indices]
                self.mod_valid = self.mod_valid[indices]

        def crop(self, tokens_to_remove: int) -> None:
            """Forget the last `-tokens_to_remove` sequence positions (counted like a dense layer)."""
            if tokens_to_remove > 0:
                raise ModAdaptError("cropping a MoD cache takes a negative number of tokens to remove.")
            if tokens_to_remove == 0:
                return
            if self.is_sliding:
                raise ModAdaptError("cropping the cache of a sliding-window MoD layer is not supported.")
            self.mod_as_rows()
            self.mod_seen = max(0, self.mod_seen + tokens_to_remove)
            if self.mod_index is None:
                return
            survives = self.mod_index < self.mod_seen
            columns = survives.any(0).nonzero()
            width = int(columns.max()) + 1 if columns.numel() else 0
            self.mod_index = self.mod_index[:, :width]
            self.mod_valid = self.mod_valid[:, :width] & survives[:, :width]
            self.mod_all_valid = False
            self.keys = self.keys[..., :width, :]
            self.values = self.values[..., :width, :]

    ModCacheLayer.__name__ = ModCacheLayer.__qualname__ = f"Mod{base.__name__}"
    return ModCacheLayer


def mod_cache_layer(cache: Cache, layer_index: int):
    """The cache layer of a MoD layer, created and given bookkeeping on first use."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModAdaptError(f"MoD layers need a transformers Cache with per-layer storage, got {type(cache).__name__}.")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_index and replicate is not None:
        layers.append(replicate())
    if len(layers) <= layer_index:
        raise ModAdaptError(f"the cache has no slot for layer {layer_index}.")
    layer = layers[layer_index]
    if type(layer) in _CLASSES.values():
        return layer
    if not isinstance(layer, DynamicLayer):
        raise ModAdaptError(
            f"MoD layers need a dynamic KV cache, but layer {layer_index} uses {type(layer).__name__}; "
            "generate with the default DynamicCache (no cache_implementation='static')."
        )
    base = type(layer)
    if base not in _CLASSES:
        _CLASSES[base] = _with_bookkeeping(base)
    layer.__class__ = _CLASSES[base]
    layer.mod_reset_book()
    return layer
