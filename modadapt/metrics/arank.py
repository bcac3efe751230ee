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
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import ModAdaptError
from .calibration import Batch, forward_batches, padding_mask_of, summarize
from .layer_stack import find_layers


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

    Each layer's maps are reduced to ranks inside the forward, as soon as that layer has computed
    them, and then dropped: at no time are more than one layer's `T x T` maps held. Runs on
    whatever device the model is on.

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
    counts: list[torch.Tensor] = []
    current: dict = {}

    def on_map(index: int, probs: torch.Tensor, is_causal: bool) -> None:
        use_causal = is_causal if causal is None else causal
        ranks[index].append(attention_rank(probs, causal=use_causal, padding_mask=current["mask"], tol=tol).cpu())

    with attention_maps(model, on_map):
        for batch, size in forward_batches(model, batches, progress=progress, desc="ARank"):
            mask = padding_mask_of(batch)
            current["mask"] = mask
            yield_ = yield_forward(model, batch)
            counts.append(mask.sum(dim=1).float().cpu() if mask is not None else torch.full((size[0],), float(size[1])))
            del yield_
    missing = [i for i, r in enumerate(ranks) if len(r) != len(counts)]
    if missing:
        raise ModAdaptError(f"no attention maps were captured for layers {missing}; is this model supported?")
    tokens = torch.cat(counts)
    return [summarize(i, torch.cat(r), tokens) for i, r in enumerate(ranks)]
