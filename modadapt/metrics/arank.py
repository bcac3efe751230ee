"""ARank: the rank of a layer's attention maps, γ-MoD's signal for which layers to convert.

γ-MoD (Luo et al., arXiv 2410.13859) computes, per layer and head, `torch.linalg.matrix_rank` of
the attention-probability map, averages over heads and estimates it on a small sample. Low rank
means many tokens attend alike (redundant tokens), so the layer is a good place to skip tokens.

For causal maps we follow the official code exactly: keep the lower triangle and zero the diagonal
before taking the rank (the diagonal of a causal map is never zero and would add rank by itself).
Bidirectional maps enter as they are. Padding is removed per sample: padded rows and columns are
zeroed, which gives exactly the rank of the real tokens' sub-map, and the default tolerance is the
one `matrix_rank` would use on that sub-map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..adapters.base import AttentionMapCallback
from ..attention_probe import AttentionProbe
from ..errors import ModAdaptError
from ..mod_layer import state_of
from ..plugins import find_adapter
from .calibration import Batch, device_batches, evaluating, padding_mask_of, run_model, summarize
from .layer_stack import analysis_adapter, find_layers


def attention_rank(
    attn: torch.Tensor,
    *,
    causal: bool,
    padding_mask: torch.Tensor | None = None,
    tol: float | None = None,
) -> torch.Tensor:
    """Per-sample rank of attention maps, averaged over heads.

    Args:
        attn: Attention probabilities `[B, H, T, T]` (query rows, key columns).
        causal: Keep only the lower triangle and zero the diagonal first (as γ-MoD's code does).
        padding_mask: `[B, T]`, True/1 for real tokens; only real rows and columns enter the rank.
        tol: Absolute singular-value tolerance; None uses `matrix_rank`'s default relative one
            (`eps · n · σ_max`, with `n` the sample's number of real tokens).

    Returns:
        `[B]` float tensor: the mean over heads of each head's rank.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ModAdaptError(f"attention maps must be [B, H, T, T], got shape {tuple(attn.shape)}.")
    maps = attn.detach().float()
    size = maps.shape[-1]
    if causal:
        maps = torch.tril(maps, diagonal=-1)
    if padding_mask is not None:
        real = padding_mask.to(device=maps.device, dtype=torch.bool)
        if real.shape != (maps.shape[0], size):
            raise ModAdaptError(f"padding_mask must be [B, T] = {(maps.shape[0], size)}, got {tuple(real.shape)}.")
        keep = (real[:, :, None] & real[:, None, :])[:, None].to(maps.dtype)
        maps = maps * keep
        n_real = real.sum(dim=1).to(maps.dtype)
    else:
        n_real = torch.full((maps.shape[0],), float(size), device=maps.device)
    if tol is not None:
        ranks = torch.linalg.matrix_rank(maps, atol=tol, rtol=0.0)
    else:
        rtol = (torch.finfo(maps.dtype).eps * n_real.clamp(min=1))[:, None]
        ranks = torch.linalg.matrix_rank(maps, rtol=rtol)
    return ranks.to(torch.float32).mean(dim=1)


def layer_aranks(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    causal: bool | None = None,
    tol: float | None = None,
    progress: bool = False,
) -> list[dict]:
    """Per-layer ARank of `model` over calibration `batches`.

    Each layer's maps are reduced to ranks as soon as they exist and then dropped: at no time are
    more than one layer's `T x T` maps held. Runs on whatever device the model is on (GPU included),
    one batch at a time.

    Args:
        model: A transformers model or a timm ViT.
        batches: Dicts of model keyword arguments (`input_ids`, `attention_mask`, ...) or input
            tensors (`pixel_values`); `attention_mask` marks padding.
        causal: Treat maps as causal; None reads it from the attention modules (`is_causal`).
        tol: See `attention_rank`.
        progress: Show a tqdm progress bar.

    Returns:
        One dict per layer: ``layer``, ``mean``/``std`` of the per-sample ARank, and
        ``normalized_mean``/``normalized_std`` of ARank divided by the sample's real-token count.
    """
    layers = find_layers(model)
    ranks: list[list[torch.Tensor]] = [[] for _ in layers]
    normalized: list[list[torch.Tensor]] = [[] for _ in layers]
    current: dict = {}

    def on_map(index: int, probs: torch.Tensor, is_causal: bool) -> None:
        mask = current["mask"]
        rank = attention_rank(probs, causal=is_causal if causal is None else causal, padding_mask=mask, tol=tol)
        tokens = mask.sum(dim=1).to(rank) if mask is not None else torch.full_like(rank, probs.shape[-1])
        ranks[index].append(rank.cpu())
        normalized[index].append((rank / tokens.clamp(min=1)).cpu())

    with evaluating(model), attention_maps(model, on_map) as run:
        for batch in device_batches(model, batches, progress=progress, desc="ARank"):
            current["mask"] = padding_mask_of(batch)
            run(batch)
    if not ranks[0]:
        raise ModAdaptError("no calibration batch was given.")
    missing = [i for i, r in enumerate(ranks) if len(r) != len(ranks[0])]
    if missing:
        raise ModAdaptError(f"no attention maps were captured for layers {missing}; is this model supported?")
    return [summarize(i, torch.cat(r), torch.cat(n)) for i, (r, n) in enumerate(zip(ranks, normalized))]


@contextlib.contextmanager
def attention_maps(model: nn.Module, callback: AttentionMapCallback) -> Iterator[Callable[[Batch], None]]:
    """Yields `run(batch)`: one forward of `model` that calls `callback(layer, probs, causal)` once
    per layer with its attention probabilities `[B, H, T, T]`, one layer's maps at a time.

    Models an installed adapter can probe (`modadapt.attention_probe`) keep their attention kernel:
    the maps are recomputed layer by layer from the recorded queries and keys. Other models (e.g.
    a BERT encoder) fall back to a kernel that materialises the maps, only inside the context
    (`Adapter.attention_maps`: transformers models run eager attention there, timm blocks their
    unfused path); the original kernel is restored on exit. Either way each layer's maps are handed over and dropped at once.
    """
    adapter, layers = analysis_adapter(model)
    probe = _try_probe(model, len(layers))
    if probe is not None:
        with probe:
            yield lambda batch: _run_probed(model, probe, len(layers), batch, callback)
        return
    with adapter.attention_maps(model, layers, callback):
        yield lambda batch: run_model(model, batch)


def probe(model: nn.Module, layers: list[int]) -> AttentionProbe:
    """A probe on `layers` of `model` (converted or not), built by the adapter that handles it
    (a converted model's own, configured adapter)."""
    state = state_of(model)
    adapter = state.adapter if state is not None else find_adapter(model)
    return adapter.attention_probe(model, layers)


def _try_probe(model: nn.Module, num_layers: int):
    try:
        return probe(model, list(range(num_layers)))
    except ModAdaptError:  # no adapter, or one that cannot observe this model's kernel
        return None


def _run_probed(model: nn.Module, probe, num_layers: int, batch: Batch, callback: AttentionMapCallback) -> None:
    from ..attention_probe import attention_blocks

    run_model(model, batch)
    valid = padding_mask_of(batch)
    for index in range(num_layers):
        record = probe.records.pop(index, None)  # popping releases this layer's q/k
        if record is None:
            raise ModAdaptError(f"the attention probe recorded nothing for layer {index}.")
        keys_valid = valid if valid is not None and valid.shape[1] == record.k.shape[2] else None
        blocks = attention_blocks(
            record.q,
            record.k,
            scale=record.scale,
            causal=record.causal,
            valid=keys_valid,
            mask=record.mask,
            softcap=record.softcap,
        )
        callback(index, torch.cat([probs for _, probs in blocks], dim=2), record.causal)
