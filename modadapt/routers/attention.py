"""`attention`: A-MoD, routing by the preceding layer's attention map (Gadhikar et al., 2024,
arXiv 2412.20875, "Attention Is All You Need For Mixture-of-Depths Routing").

The score of token j at MoD layer l is the attention j receives in layer l-1, averaged over heads
and over the queries that may see it (the column mean of the softmax map). Each sequence keeps its
top `ceil(capacity * T)` tokens. No trainable parameters; layer l-1 must stay dense (the default
`every-other` placement satisfies it). The map is recomputed from layer l-1's q and k (recorded by
an attention probe, so l-1 keeps its fused kernel) in query chunks: no T x T map is stored.

Causal decoders: a query sees key j only if it is at or after j, so the only query at or before j
that sees j is j itself. The causal statistic is therefore j's attention to itself, normalised
by how many keys j sees: `score_j = n_visible_j * mean_heads softmax(q_j . k / sqrt d)_j`
(1.0 = uniform attention). Training keeps the top-k of this score; the causal rule (eval and
decode) keeps token j iff `score_j >= threshold`. By default (`threshold=calibrated`) the cut-off
is the score's top-k boundary averaged over training steps, so evaluation keeps about `capacity`
of the tokens; before any training step it is 1.0 (j attends to itself at least as much as to an
average visible key: ~96 % kept on our byte-level LM, no saving). A number fixes it. The rule uses
only tokens <= j, so prefill + decode equal a full forward. Bidirectional models (ViTs) always
keep the top-k at capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention_probe import AttentionProbe, AttentionRecord, allowed_keys, attention_blocks, column_mean_attention
from ..errors import ModAdaptError
from .base import Router, RoutingContext
from .options import RouterOptions, option


def attention_router_flops(batch: int, queries: int, keys: int, heads: int, head_dim: int) -> int:
    """Extra FLOPs of one `attention` routing decision: recomputing layer l-1's softmax map from q
    and k (2*d per score for q.k, 1 for the scale, 4 for max-subtract, exp, sum and divide) and the
    column (or diagonal) reduction (1 per score). Causal maps are computed in full and masked, so
    they cost the same. The top-k is comparisons only and counts 0."""
    return batch * heads * queries * keys * (2 * head_dim + 6)


@dataclass(frozen=True)
class AttentionOptions(RouterOptions):
    # 1.0 before calibration: self-attention at least uniform.
    threshold: float | None = option(
        None,
        "causal decoders keep token j iff its self-attention score >= threshold; calibrated: the "
        "top-k boundary learnt while training (1.0 before any step)",
        none="calibrated",
        calibrated=1.0,
    )
    chunk: int = option(256, "query rows per block when the attention map is recomputed", low=1)


class AttentionRouter(Router):
    """A-MoD: keep the tokens that received the most attention in the preceding (dense) layer."""

    name = "attention"
    causal = False
    capacity_based = True
    graphable = False  # scores from the attention probe of the layer before
    densest_layers = "every-other"  # the layer before each MoD layer stays dense
    Options = AttentionOptions

    def __init__(self, hidden_size: int, capacity: float, layer_index: int, **kwargs):
        super().__init__(hidden_size, capacity, layer_index, **kwargs)
        self.chunk = self.options.chunk
        self.source = layer_index - 1
        self.probe: AttentionProbe | None = None

    @classmethod
    def prepare_model(cls, model, adapter, layer_indices: list[int], routers: dict) -> list:
        adjacent = [i for i in layer_indices if i - 1 in layer_indices]
        if adjacent:
            i = adjacent[0]
            raise ModAdaptError(
                f"router 'attention' scores layer {i} with layer {i - 1}'s attention map, so layer {i - 1} must "
                f"stay dense; choose layers with no two neighbours (e.g. layers='every-other')."
            )
        probe = adapter.attention_probe(model, [i - 1 for i in layer_indices])
        for router in routers.values():
            router.probe = probe
        return [probe]

    def record(self, tokens: int) -> AttentionRecord:
        record = self.probe.records.get(self.source) if self.probe is not None else None
        if record is None or record.q.shape[2] != tokens:
            raise ModAdaptError(
                f"router 'attention' at layer {self.layer_index} needs layer {self.source}'s attention from the same "
                "forward; run the whole model (or its layer stack), not this layer alone."
            )
        return record

    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        rec = self.record(hidden.shape[1])
        if rec.causal:
            scores = causal_attention_score(rec, chunk=self.chunk)
        else:
            valid = ctx.real if ctx.real is not None and ctx.real.shape[1] == rec.k.shape[2] else None
            scores = column_mean_attention(
                rec.q,
                rec.k,
                scale=rec.scale,
                causal=False,
                valid=valid,
                mask=rec.mask,
                chunk=self.chunk,
                softcap=rec.softcap,
            )
        return scores.expand(hidden.shape[0], -1)

    def causal_keep(self, logits, hidden, ctx):
        return logits >= self.causal_threshold(ctx.layer_index)

    def gate(self, logits):
        return None

    def extra_flops(self, matmul_only: bool = False) -> int:
        """Recomputing layer l-1's map for the last decision (from the recorded q/k shapes); with
        `matmul_only`, just its `q . k` matmul (the part a flop counter sees by itself)."""
        rec = self.probe.records.get(self.source) if self.probe is not None else None
        if rec is None:
            return 0
        B, H, Tq, d = rec.q.shape
        Tk = rec.k.shape[2]
        return 2 * B * H * Tq * Tk * d if matmul_only else attention_router_flops(B, Tq, Tk, H, d)


def causal_attention_score(rec: AttentionRecord, *, chunk: int = 256) -> torch.Tensor:
    """`[B, Tq]`: each query's head-averaged attention to its own key times its visible-key count."""
    B, H, Tq, _ = rec.q.shape
    Tk = rec.k.shape[2]
    out = []
    for start, probs in attention_blocks(
        rec.q, rec.k, scale=rec.scale, causal=True, mask=rec.mask, chunk=chunk, softcap=rec.softcap
    ):
        rows = probs.shape[2]
        own = (torch.arange(start, start + rows, device=probs.device) + Tk - Tq).view(1, 1, rows, 1)
        diag = probs.gather(-1, own.expand(B, H, rows, 1)).squeeze(-1).mean(1)
        allowed = allowed_keys(rows, start, Tq, Tk, causal=True, valid=None, mask=rec.mask, device=probs.device)
        visible = allowed.any(1).sum(-1).to(diag.dtype)
        out.append(diag * visible)
    return torch.cat(out, dim=1)
