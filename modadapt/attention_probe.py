"""Observe the query/key tensors of chosen layers during ordinary forwards, and turn them into
attention statistics without ever holding a full T x T map.

Fused attention kernels never materialise the softmax map, and switching a whole model to eager
attention to see one layer's map is slow and memory-hungry. A probe instead records, for each
watched layer, the tensors the kernel receives (queries and keys after RoPE / q-k norms, heads
split) and leaves the kernel as it was. The statistics are then recomputed from q and k in query
chunks::

    from modadapt.attention_probe import column_mean_attention, attention_blocks
    from modadapt.plugins import find_adapter

    with find_adapter(model).attention_probe(model, [3, 5]) as watched:  # any model an adapter handles
        model(inputs)
    rec = watched.records[3]                        # AttentionRecord of layer 3's last call
    received = column_mean_attention(rec.q, rec.k, scale=rec.scale, causal=rec.causal, mask=rec.mask)
    for start, probs in attention_blocks(rec.q, rec.k, scale=rec.scale, causal=rec.causal, mask=rec.mask):
        ...                                         # probs: [B, H, rows, Tk] for query rows start..

Adapters build probes (`Adapter.attention_probe`): timm ViTs hook `block.attn.qkv`; Hugging Face
decoders route attention through a registered attention function (`PROBE_ATTENTION`, or
`PROBE_EAGER_ATTENTION` for eager models) that records and then calls the kernel the model ran
before, so outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .deprecation import moved_names

__getattr__ = moved_names(__name__, {"probe": "modadapt.metrics.arank:probe"})

#: Name of the transformers attention function a probed HF model runs (records, then SDPA).
PROBE_ATTENTION = "modadapt_probe"
#: The same for a model that runs eager attention (records, then the family's eager attention,
#: soft-capping included: Gemma 2).
PROBE_EAGER_ATTENTION = "modadapt_probe_eager"


@dataclass
class AttentionRecord:
    """The inputs of one attention call of a watched layer.

    Attributes:
        q: `[B, H, Tq, d]` queries as the kernel saw them (after RoPE / q-k norm).
        k: `[B, Hk, Tk, d]` keys, including cached ones; `Hk` may divide `H` (GQA, unexpanded).
            Query row i sits at key position `Tk - Tq + i`.
        scale: Softmax scale applied to `q . k`.
        causal: Whether the layer's attention is causal (applied on top of `mask`).
        mask: `[B, 1 or H, Tq, Tk]` bool, True where a query may attend; None for no mask.
        softcap: The kernel's soft-capping of the scores, `c * tanh(s / c)` (Gemma 2), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    causal: bool
    mask: torch.Tensor | None = None
    softcap: float | None = None


class AttentionProbe:
    """Records the last `AttentionRecord` of each watched layer; `remove()` (or leaving the
    `with` block) detaches it. Records hold references (no copies) and are detached from the
    graph: statistics are for routing and analysis, not for gradients."""

    def __init__(self, layers: list[int]):
        self.layers = list(layers)
        self.records: dict[int, AttentionRecord] = {}
        self._undo: list[Callable[[], None]] = []

    def record(self, layer: int, q, k, *, scale: float, causal: bool, mask=None, softcap: float | None = None) -> None:
        if mask is not None and mask.dtype != torch.bool:  # additive float mask: -inf / min = blocked
            mask = mask > torch.finfo(mask.dtype).min / 2
        self.records[layer] = AttentionRecord(
            q.detach(), k.detach(), float(scale), causal, mask, None if softcap is None else float(softcap)
        )

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.records.clear()

    def __enter__(self) -> AttentionProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def allowed_keys(
    rows: int,
    start: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    valid: torch.Tensor | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """`[B or 1, 1 or H, rows, Tk]` bool of the keys query rows `start..start+rows` may see (None: all)."""
    allowed = None
    if causal:
        q_pos = torch.arange(start, start + rows, device=device) + (k_len - q_len)
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if valid is not None:
        v = valid[:, None, None, :].bool()
        allowed = v if allowed is None else allowed & v
    if mask is not None:
        m = mask[:, :, start : start + rows] if mask.shape[2] == q_len else mask
        allowed = m if allowed is None else allowed & m
    return allowed


def attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    valid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk: int = 256,
    softcap: float | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(start, probs)`: the softmax attention of query rows `start..start+rows` as
    `[B, H, rows, Tk]` float32, `chunk` rows at a time (the full map is never held).

    Args:
        q: `[B, H, Tq, d]` queries; row i sits at key position `Tk - Tq + i`.
        k: `[B, Hk, Tk, d]` keys; `Hk` must divide `H` (grouped-query attention).
        scale: Softmax scale.
        causal: Mask keys after each query's position.
        valid: `[B, Tk]` bool, False for padding keys.
        mask: `[B, 1 or H, Tq, Tk]` bool, True where a query may attend.
        chunk: Query rows per block.
        softcap: Soft-cap the scaled scores to `softcap * tanh(s / softcap)` first (None: not).

    Rows that may see no key at all (padding queries) are all zeros.
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    kf = k.float()
    if k.shape[1] != H:
        kf = kf.repeat_interleave(H // k.shape[1], dim=1)
    for start in range(0, Tq, chunk):
        rows = min(chunk, Tq - start)
        scores = torch.matmul(q[:, :, start : start + rows].float(), kf.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = allowed_keys(rows, start, Tq, Tk, causal=causal, valid=valid, mask=mask, device=q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:
            probs = torch.nan_to_num(probs, nan=0.0)
        yield start, probs


def column_mean_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    valid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk: int = 256,
    softcap: float | None = None,
) -> torch.Tensor:
    """`[B, Tk]` attention each key receives, averaged over heads and over the queries allowed to
    see it (A-MoD's routing statistic). Arguments as for `attention_blocks`; `valid` also drops
    padding queries (query row i is valid iff key `Tk - Tq + i` is). Keys no query sees get 0."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    total = torch.zeros(B, Tk, dtype=torch.float32, device=q.device)
    seen = torch.zeros(B, Tk, dtype=torch.float32, device=q.device)
    q_valid = valid[:, Tk - Tq :].bool() if valid is not None else None
    for start, probs in attention_blocks(
        q, k, scale=scale, causal=causal, valid=valid, mask=mask, chunk=chunk, softcap=softcap
    ):
        rows = probs.shape[2]
        allowed = allowed_keys(rows, start, Tq, Tk, causal=causal, valid=valid, mask=mask, device=q.device)
        if allowed is None:
            allowed = torch.ones(1, 1, rows, Tk, dtype=torch.bool, device=q.device)
        allowed = allowed.any(1)  # [B or 1, rows, Tk]: seen by at least one head's mask
        if q_valid is not None:
            row_valid = q_valid[:, start : start + rows, None]
            allowed = allowed & row_valid
            probs = probs * row_valid[:, None].to(probs.dtype)
        total += probs.sum(dim=(1, 2)) / H
        seen += allowed.to(torch.float32).sum(1).expand(B, Tk)
    return total / seen.clamp_min(1.0)
