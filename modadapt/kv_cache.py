"""Per-layer KV bookkeeping for MoD layers.

A MoD layer writes K/V only for the tokens it processes, so its cache holds fewer entries than a
dense layer's, and in a batch the rows may disagree. Beside K/V, the layer's cache keeps, for
every slot, the sequence index of the token it holds and whether the slot is real (rows that kept
fewer tokens than the widest row have filler slots that nobody attends to). The masks of later
calls are built from this. The bookkeeping lives in the transformers cache layer itself (its class
is swapped for a cached subclass, as for decoder layers), so beam reordering, batch selection and
cropping move it together with K/V.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import ModAdaptError

_CLASSES: dict[type, type] = {}


def _with_bookkeeping(base: type) -> type:
    """A subclass of a cache layer class that keeps the bookkeeping in step with every cache
    operation. Single inheritance, so an existing object's `__class__` can be swapped in place."""

    class ModCacheLayer(base):
        mod_seen: int  # tokens that reached this layer so far (processed or skipped)
        mod_all_valid: bool  # no filler slot is stored: masks may skip the validity check

        def mod_reset_book(self) -> None:
            self._mod_index = None  # [B, L] sequence index of each cached slot
            self._mod_valid = None  # [B, L] False for filler slots
            self._mod_pending: list[int] = []  # positions appended by `mod_append`, not yet in _mod_index
            self.mod_seen = 0
            self.mod_all_valid = True

        @property
        def mod_index(self) -> torch.Tensor | None:
            self._mod_flush()
            return self._mod_index

        @mod_index.setter
        def mod_index(self, value: torch.Tensor | None) -> None:
            self._mod_index = value

        @property
        def mod_valid(self) -> torch.Tensor | None:
            self._mod_flush()
            return self._mod_valid

        @mod_valid.setter
        def mod_valid(self, value: torch.Tensor | None) -> None:
            self._mod_valid = value

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

        def mod_record(self, index: torch.Tensor, valid: torch.Tensor | None) -> None:
            """Append the slots just written (`valid` None: all real), then align with the stored
            K/V (sliding layers trim)."""
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

        def mod_write_packed(
            self, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, segments: torch.Tensor, tokens: int
        ) -> None:
            """Store a packed call's K/V (`[1, Hk, N, d]`, `modadapt.varlen`) in the per-row
            layout: row b's kept tokens in its first slots, filler slots after. `indices` `[1, N]`
            index the flattened `[B * tokens]` inputs; `segments` are the row offsets."""
            counts = segments.diff().long()
            B, N = len(counts), indices.shape[1]
            widest, fewest = torch.stack([counts.max(), counts.min()]).tolist()
            rows = indices[0] // tokens
            slots = torch.arange(N, device=indices.device) - segments[:-1].long()[rows]

            def spread(packed: torch.Tensor) -> torch.Tensor:
                out = packed.new_zeros(B, packed.shape[1], widest, packed.shape[3])
                out[rows, :, slots] = packed[0].transpose(0, 1)
                return out

            self.update(spread(key), spread(value))
            index = torch.zeros(B, widest, dtype=torch.long, device=indices.device)
            index[rows, slots] = indices[0] % tokens
            valid = None if widest == fewest else torch.arange(widest, device=indices.device) < counts[:, None]
            self.mod_record(index + self.mod_seen, valid)

        def reset(self) -> None:
            super().reset()
            self.mod_reset_book()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            if self.mod_index is not None:
                self.mod_index = self.mod_index.index_select(0, beam_idx.to(self.mod_index.device))
                self.mod_valid = self.mod_valid.index_select(0, beam_idx.to(self.mod_valid.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            if self.mod_index is not None:
                self.mod_index = self.mod_index.repeat_interleave(repeats, dim=0)
                self.mod_valid = self.mod_valid.repeat_interleave(repeats, dim=0)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
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
        raise ModAdaptError(
            f"MoD layers need a transformers Cache with per-layer storage, got {type(cache).__name__}."
        )
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
