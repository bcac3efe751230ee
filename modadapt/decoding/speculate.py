"""Lossless speculative decoding on one set of weights: the converted model drafts, the dense one verifies.

A converted model holds two models in the same weights: with its routers (tokens skip MoD layers:
cheaper) and dense (`modadapt.dense`: every layer runs every token, what the unconverted model
computes). `GraphedDecoder(model, speculate=K)` drafts `K` tokens one at a time with the converted
model (by default its MoD layers skipped outright, `Draft`), then runs the dense computation once
on the `K + 1` tokens (the last emitted token and the drafts) and keeps the longest prefix the dense model agrees with, plus the dense model's own next
token. Greedy, the tokens are the dense model's greedy tokens; sampling, the acceptance test of
speculative sampling (accept draft `x` with probability `min(1, p(x) / q(x))`, else draw from
`max(0, p - q)`, renormalised) makes them draws from the dense model's distribution.

One static cache, the verifier's: every layer holds every verified token's K/V, in slots
`[0, base)` of each row. A round's draft starts from `base` at every layer: a dense layer writes
the draft token's K/V at `base + j` (draft token `j`), a MoD layer that keeps it at `base + d`
(`d`: draft tokens it kept so far this round), and a MoD layer that skips it writes none. A
drafted token attends to the verified slots `[0, base)` (dense K/V, the prompt's and every
accepted token's) and to the draft slots its layer wrote this round. The verification then writes
all `K + 1` tokens at every layer in slots `[base, base + K]`, over whatever the draft wrote
there (the draft never writes past `base + K - 1`), and `base` advances by the accepted count plus
one; slots past it are stale and never read. So there is no second copy of the weights, nor of
the prompt's cache, and the draft's writes only ever land where the verification overwrites them.

How deep the draft runs is a knob (`Draft`): every MoD layer skipped outright (the default: the
converted model with its MoD layers deleted; on the H200 it beat the routers' own choice at every
batch and K measured, see `DEFAULT_DRAFT`), or the routers' causal rules as trained, shifted by a
`margin` (keep fewer tokens than the routers would), and/or some MoD layers skipped.
The acceptance decision runs on the device; the host reads back only every few rounds (when every
row has its tokens, or every row has ended). Draft steps are captured like the plain decode step
(`step.DecodeStep`, per branch mode), the verification as one more graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ModAdaptError
from .sampling import Sampling, sampling_logits
from .static_cache import KeyLengths, StaticCache
from .step import DecodeStep, StepLayer

# The draft `GraphedDecoder(speculate=K)` runs when `draft=` is not given. Measured on the quality
# benchmark's trained 97.5M-parameter models (H200, compiled graphed steps, benchmarks/README.md):
# skipping every MoD layer ran 1.17-1.43x dense at B=1 K=4 and 1.13-1.15x at B=8, where the
# routers' own choice ran 0.89x and 0.75x on the 0.69-FLOPs model (2026-12-02) and 0.98x and 0.63x
# on the 0.53 one (2026-12-01): a routed draft layer still costs most of a dense one at decode
# shapes, while the dense verifier accepts the shallower drafts nearly as often.
DEFAULT_DRAFT = "skip=all"


@dataclass(frozen=True)
class Draft:
    """How the draft routes (`GraphedDecoder(..., speculate=K, draft=...)`).

    Attributes:
        skip: MoD layers the draft skips outright (their indices in the layer stack), or
            ``"all"``: every MoD layer. Skipped layers cost the draft nothing and write no K/V.
        margin: subtracted from every router's score before its causal rule: ``> 0`` keeps fewer
            tokens than the routers would (a shallower, cheaper draft that the dense model
            accepts less often), ``< 0`` more. It shifts the score a rule compares with its
            cut-off (`topk` and `shared-vl` scores, `threshold-p` logits, `random` hashes); a
            `topk` router with ``causal_rule=predictor`` thresholds its predictor, which the margin
            does not move.

    `Draft()` is the routers' own choice. `Draft.of` also reads None (`DEFAULT_DRAFT`: every MoD
    layer skipped), a dict (``{"skip": [2], "margin": 0.5}``) or a string, what a sweep passes on
    a command line: ``"routers"``, ``"margin=0.5"``, ``"skip=all"``, ``"skip=2,4;margin=0.25"``.
    """

    skip: tuple[int, ...] | str = ()
    margin: float = 0.0

    @classmethod
    def of(cls, value: Any) -> Draft:
        if value is None:
            return cls._parse(DEFAULT_DRAFT)
        if isinstance(value, Draft):
            skip = value.skip if isinstance(value.skip, str) else tuple(value.skip)
            return cls(skip, value.margin)._checked()
        if isinstance(value, str):
            return cls._parse(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"skip", "margin"})
            if unknown:
                raise ModAdaptError(f"draft has no option {unknown[0]!r}; its options are margin and skip.")
            skip = value.get("skip", ())
            return cls(skip if isinstance(skip, str) else tuple(skip), value.get("margin", 0.0))._checked()
        raise ModAdaptError(f"draft must be a modadapt.decoding.Draft, a dict or a string, got {value!r}")

    @classmethod
    def _parse(cls, text: str) -> Draft:
        text = text.strip()
        if text in ("", "routers"):
            return cls()
        fields: dict[str, Any] = {}
        for part in text.split(";"):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or name not in ("skip", "margin") or name in fields:
                raise ModAdaptError(
                    f"cannot read draft {text!r}: write 'routers', or 'margin=X' and/or 'skip=all|I,J' joined by ';'."
                )
            if name == "margin":
                try:
                    fields[name] = float(value)
                except ValueError:
                    raise ModAdaptError(f"draft margin must be a number, got {value!r}") from None
            elif value == "all":
                fields[name] = "all"
            else:
                try:
                    fields[name] = tuple(int(v) for v in value.split(",") if v.strip())
                except ValueError:
                    raise ModAdaptError(
                        f"draft skip must be 'all' or layer indices like '2,4', got {value!r}"
                    ) from None
        return cls(**fields)._checked()

    def _checked(self) -> Draft:
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not math.isfinite(self.margin):
            raise ModAdaptError(f"draft margin must be a finite number, got {self.margin!r}")
        if isinstance(self.skip, str):
            if self.skip != "all":
                raise ModAdaptError(f"draft skip must be 'all' or a list of MoD layer indices, got {self.skip!r}")
        elif not all(isinstance(i, int) and not isinstance(i, bool) for i in self.skip):
            raise ModAdaptError(f"draft skip must list MoD layer indices (ints), got {self.skip!r}")
        return self

    def skipped(self, mod_layers: list[int]) -> frozenset[int]:
        """The MoD layers the draft skips, checked against the model's MoD layers."""
        if self.skip == "all":
            return frozenset(mod_layers)
        other = sorted(set(self.skip) - set(mod_layers))
        if other:
            raise ModAdaptError(
                f"draft skip names layer {other[0]}, which is not a MoD layer; the MoD layers are {list(mod_layers)}."
            )
        return frozenset(self.skip)

    def __str__(self) -> str:
        """The string form `Draft.of` reads back."""
        parts = []
        if self.skip:
            parts.append("skip=" + (self.skip if isinstance(self.skip, str) else ",".join(map(str, self.skip))))
        if self.margin:
            parts.append(f"margin={self.margin:g}")
        return ";".join(parts) or "routers"


def greedy_acceptance(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` `[B, K + 1, V]` of the verification, `drafts` `[B, K]`: (accepted drafts `[B]`, the
    dense model's next token `[B, 1]` after them)."""
    best = logits.argmax(-1)
    accepted = (drafts == best[:, :-1]).long().cumprod(1).sum(1)
    return accepted, best.gather(1, accepted[:, None])


def sampled_acceptance(
    logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor, sampling: Sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). `draft_probs` `[B, K + 1, V]`
    holds the distributions the drafts were drawn from (its last slice zero). Draft `j` is accepted
    with probability `min(1, p_j(x) / q_j(x))` while every earlier one was; at the first rejection
    the next token is drawn from `max(0, p - q)` renormalised, after `K` acceptances from `p_K`.
    `p` and `q` are the filtered (temperature, top-k, top-p) distributions of the dense model and
    of the draft, so the tokens are distributed as the dense model samples them."""
    B, T, V = logits.shape
    p = sampling_logits(logits.reshape(B * T, V), sampling).softmax(-1).view(B, T, V)
    index = drafts.unsqueeze(-1)
    p_draft = p[:, :-1].gather(-1, index).squeeze(-1)
    q_draft = draft_probs[:, :-1].gather(-1, index).squeeze(-1)
    u = torch.rand(B, T - 1, device=logits.device)
    accepted = (u * q_draft < p_draft).long().cumprod(1).sum(1)  # u < p / q, q > 0 for a drawn token
    at = accepted.view(B, 1, 1).expand(B, 1, V)
    p_next = p.gather(1, at).squeeze(1)
    residual = (p_next - draft_probs.gather(1, at).squeeze(1)).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)  # p == q: rounding only
    return accepted, torch.multinomial(residual, 1)


class DraftStep(DecodeStep):
    """One draft token per row: the decode step's pieces, routed by the converted model's routers
    (narrowed by the `Draft`), over the verifier's cache. `out` `[B, K]` collects the round's
    drafts (`count`: the draft's index in the round); sampling, `probs` `[B, K + 1, V]` the
    distributions they were drawn from."""

    def __init__(
        self,
        decoder: Any,
        batch: int,
        capacity: int,
        k: int,
        mode: str,
        sampling: Sampling | None,
        skip: frozenset[int],
        margin: float,
    ):
        self.skip, self.margin = skip, float(margin)
        super().__init__(decoder, batch, (capacity,) * len(decoder.layers), k, mode, sampling)
        head = decoder.head
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        self.probs = torch.zeros(batch, k + 1, vocab, device=self.token.device) if sampling is not None else None

    def _pieces(self) -> list:
        d, pieces = self.decoder, [("run", self._begin)]
        for i, layer in enumerate(d.layers):
            if not layer.mod:
                pieces.append(("run", lambda i=i: self._dense(i)))
            elif i not in self.skip:  # a skipped layer: no piece at all, its length stays at base
                pieces += self._mod_pieces(i)
        return pieces + [("run", self._end)]

    def _end(self) -> None:
        d, h, B = self.decoder, self.live["h"], self.batch
        self.dense_length += 1
        logits = d.head(d.norm(h)[:, -1])
        column = self.count.clamp_max(self.out.shape[1] - 1)  # (warm-up runs past K)
        if self.sampling is None:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = sampling_logits(logits, self.sampling).softmax(-1)
            nxt = torch.multinomial(probs, 1)
            self.probs.index_copy_(1, column, probs.unsqueeze(1))
        self.token.copy_(nxt)
        self.position += 1
        self.out.scatter_(1, column.expand(B, 1), nxt)
        self.count += 1


class SpeculativeStep:
    """The buffers of one shape (batch, capacity, K) and a verification round over them: `K`
    draft steps (`DraftStep`) and one verification of `K + 1` tokens with the dense computation,
    whose acceptance runs on the device. `out` `[B, new + K + 1]` collects each row's emitted
    tokens (`count` of them, the prefill's first included); rows that have `new` stop advancing.
    Per row, `base` tokens are in the cache (all layers alike) and `fed` is the emitted token the
    next round feeds first."""

    def __init__(
        self,
        decoder: Any,
        batch: int,
        capacity: int,
        new: int,
        k: int,
        mode: str,
        sampling: Sampling | None,
        draft: Draft,
        mod_layers: list[int],
    ):
        self.decoder, self.batch, self.k, self.new, self.sampling = decoder, batch, k, new, sampling
        self.draft = DraftStep(decoder, batch, capacity, k, mode, sampling, draft.skipped(mod_layers), draft.margin)
        self.mode, self.capacities = mode, self.draft.capacities
        device = self.draft.token.device
        self.keys, self.values, self.slot_positions = self.draft.keys, self.draft.values, self.draft.slot_positions
        self.base = torch.zeros(batch, dtype=torch.long, device=device)
        # (its `positions` are each verification's, set by `_verify`)
        self.cache = StaticCache(self.keys, self.values, [self.base] * len(decoder.layers), self.slot_positions)
        self.fed = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, new + k + 1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.accepted = torch.zeros(batch, dtype=torch.long, device=device)  # drafts accepted, per row
        self.rounds = torch.zeros(batch, dtype=torch.long, device=device)  # rounds a row took part in
        self._offsets = torch.arange(k + 1, device=device)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self._cu_q, self._cu_k = cu * (k + 1), cu * capacity
        self._used = torch.zeros(batch, dtype=torch.int32, device=device)
        self._draft_lengths = list({id(t): t for t in self.draft.lengths}.values())
        self.graph = None
        self.rounds_done = 0

    @property
    def lengths(self) -> list[torch.Tensor]:
        """Each layer's used slots per row: `base` at every layer (the verifier's cache)."""
        return [self.base] * len(self.decoder.layers)

    @property
    def graphs(self):
        return self.draft.graphs

    def start(self, first: torch.Tensor, lengths: torch.Tensor) -> None:
        """After the prompt's cache was copied in: `first` `[B, 1]` emitted, `lengths` `[B]` cached."""
        self.base.copy_(lengths)
        self.fed.copy_(first)
        self.out.zero_()
        self.out[:, :1].copy_(first)
        self.count.fill_(1)
        self.accepted.zero_()
        self.rounds.zero_()
        self._start_round()
        self.rounds_done = 0

    def _start_round(self) -> None:
        dr = self.draft
        dr.token.copy_(self.fed)
        dr.position.copy_(self.base[:, None])
        for length in self._draft_lengths:
            length.copy_(self.base)
        dr.count.zero_()

    # --- the verification ---------------------------------------------------------------------
    def _verify(self) -> None:
        d, dr, T = self.decoder, self.draft, self.k + 1
        tokens = torch.cat([self.fed, dr.out], 1)
        positions = self.base[:, None] + self._offsets
        h = d.embed(tokens, positions)
        pe = d.position_embeddings(h, positions)
        torch.add(self.base, T, out=self._used)
        self.cache.positions = positions  # what windowed MoD layers' slot positions get
        # Every layer holds the verified tokens densely, slot s at position s: per window, one lengths
        lengths = {
            w: KeyLengths(self._used, self._cu_q, self._cu_k, queries=T, window=w, positions=positions)
            for w in set(d.windows)
        }
        for layer, w in zip(d.layers, d.windows):  # every layer on every token: MoD layers run their original forward
            h = self._call(layer, h, lengths[w], pe, positions)
        logits = d.head(d.norm(h))
        if self.sampling is None:
            accepted, nxt = greedy_acceptance(logits, dr.out)
        else:
            accepted, nxt = sampled_acceptance(logits, dr.out, dr.probs, self.sampling)
        active = self.count < self.new
        advance = torch.where(active, accepted + 1, 0)
        emitted = torch.where(self._offsets < accepted[:, None], torch.cat([dr.out, nxt], 1), nxt)
        slots = (self.count[:, None] + self._offsets).clamp_max(self.out.shape[1] - 1)  # (done rows only)
        self.out.scatter_(1, slots, emitted)
        self.count += advance
        self.base += advance
        self.accepted += torch.where(active, accepted, 0)
        self.rounds += active.long()
        self.fed.copy_(torch.where(active[:, None], nxt, self.fed))
        self._start_round()

    def _call(self, layer: StepLayer, h, lengths: KeyLengths, pe, positions):
        c = layer.names
        kwargs = {
            c.hidden: h,
            c.mask: lengths,
            c.cache: self.cache,
            c.position_ids: positions,
        }
        if pe is not None:  # rotary (learned positions were added to the embedding)
            kwargs["position_embeddings"] = pe if layer.rotary_key is None else pe[layer.rotary_key]
        out = layer.forward(layer.module, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # --- running ------------------------------------------------------------------------------
    def run_round(self) -> None:
        """`K` draft steps and the verification: eagerly, or replaying the captured graphs."""
        for _ in range(self.k):
            self.draft_token()
        self.verify()
        self.rounds_done += 1

    def draft_token(self) -> None:
        """One draft step (of a round's `K`), from its graph when captured."""
        if self.graph is not None:
            self.draft.replay()
        else:
            self.draft.run_eager()

    def verify(self) -> None:
        """The verification that ends a round (after its `K` draft steps), from its graph when
        captured. `run_round` is the two together; `benchmarks/speed.py` times them apart."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._verify()

    def warm_up(self) -> None:
        """The draft step's warm-up (`DecodeStep.warm_up`) and two verifications, on scratch
        values; with `compile`, only the first run of each compiles."""
        self.draft.warm_up()
        self._warm_up_verification()

    def _warm_up_verification(self) -> None:
        compiler = self.decoder.compiler
        with compiler.compiling():
            self._verify()
        with compiler.compiled():
            self._verify()

    def capture(self) -> None:
        """Capture the draft step (as `DecodeStep.capture`, per branch mode) and the verification
        (one graph). The buffers hold scratch values after; the caller fills them. The random
        state is put back, so that warm-up draws do not shift a sampled generation."""
        device = self.fed.device
        rng = torch.cuda.get_rng_state(device)
        try:
            self.draft._warm_up_and_capture()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._warm_up_verification()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with self.decoder.compiler.compiled(), torch.cuda.graph(graph):
                self._verify()
            self.graph = graph
        finally:
            torch.cuda.set_rng_state(rng, device)

    def stats(self) -> dict:
        """What the rounds since the prefill accepted (a host sync): per row and overall."""
        return acceptance_stats(self.k, self.rounds.tolist(), self.accepted.tolist())


def acceptance_stats(k: int, rounds: list[int], accepted: list[int]) -> dict:
    """Per-row rounds and accepted drafts at K = `k`, and overall: `acceptance` (accepted drafts /
    drafted tokens) and `tokens_per_round` (each round adds its accepted drafts and one token)."""
    drafted = sum(rounds) * k
    return dict(
        k=k,
        rounds=rounds,
        accepted=accepted,
        acceptance=sum(accepted) / drafted if drafted else None,
        tokens_per_round=(sum(accepted) + sum(rounds)) / sum(rounds) if sum(rounds) else None,
    )
