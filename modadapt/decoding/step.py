"""One decode step as pieces over static buffers, run eagerly or captured as CUDA graphs.

A step is a list of pieces: the embedding, each dense layer, each MoD layer as its routing and
its work, the head and the token pick. Capturing them is what removes the host cost of eager
decoding; how a MoD layer's work is taken or skipped inside the capture is the `branches` mode
(`BRANCHES`, described in `modadapt.decoding`). Rows that skip a layer write no K/V that is kept
and read none, so each row generates what it would alone.

Gathered rows (`"gather"`, `"gather-conditional"`): a MoD layer's work is captured once per row
count of `gather_buckets(batch)`. The routing piece orders the rows kept-first and picks the
smallest bucket that holds every kept row (none when no row keeps); the work gathers that many
rows (the kept ones, then rows that skip as filler: distinct rows, so no write collides) into a
batch of their own, runs the layer on it over the full cache (`static_cache.GatheredCache` writes
each row's K/V in its own row; the attention reads each row's own slots, filler rows none) and
copies the kept rows' results back. A filler row's K/V lands past its used length, uncounted, as
in `"select"`. The bucket is chosen on the host from one byte per MoD layer (`"gather"`, the
`"host"` mechanism) or on the GPU by one conditional node per bucket (`"gather-conditional"`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import LayerCall
from ..errors import ModAdaptError
from ..mod_layer import apply_gate
from ..routers.base import RoutingContext
from . import driver_graph
from .sampling import Sampling, next_token
from .static_cache import GatheredCache, KeyLengths, StaticCache

BRANCHES = ("auto", "conditional", "gather", "gather-conditional", "host", "select")
#: The modes whose capture needs CUDA graph conditional nodes (`conditional_nodes_available`).
CONDITIONAL = ("conditional", "gather-conditional")
#: The modes that run a MoD layer on the gathered kept rows only.
GATHER = ("gather", "gather-conditional")
_PENDING = 255  # a "host" / "gather" decision not yet copied back (decisions are 0, 1 / bucket codes)
_WARM_UPS = 2  # eager steps before a capture (each writes one K/V slot per row, from slot 0)


def torch_conditional_nodes() -> bool:
    """Whether this torch captures conditional nodes itself (`CUDAGraph.begin_capture_to_if_node`)."""
    return hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


def conditional_nodes_available() -> bool:
    """Whether a graph branch that the GPU takes or skips itself can be captured here: by torch,
    or stitched through the CUDA driver (`driver_graph`, torch builds without them)."""
    return torch_conditional_nodes() or driver_graph.available()


def available_branches(conditional: bool | None = None) -> tuple[str, ...]:
    """The branch modes this torch can capture (those of `CONDITIONAL` need conditional nodes)."""
    conditional = conditional_nodes_available() if conditional is None else conditional
    return tuple(b for b in BRANCHES if conditional or b not in CONDITIONAL)


#: `branches="auto"` branches (conditional or host) at batch > 1 where the chance that no row keeps
#: a MoD layer's token is at least this (estimated from the prompt: `none_kept`), else ``"select"``.
HOST_WHEN_NONE_KEPT = 0.1


def auto_branches(batch: int, conditional: bool, none_kept_chance: float | None = None) -> str:
    """What `branches="auto"` runs at `batch`; `conditional`: whether conditional nodes can be
    captured here (`conditional_nodes_available`); `none_kept_chance`: the chance that no row keeps
    a MoD layer's token (`none_kept`), if known.

    A branch (``"conditional"``: the GPU decides; else ``"host"``: a host round trip per MoD layer)
    at batch 1, and at batch > 1 where whole layers go unkept often enough (`HOST_WHEN_NONE_KEPT`);
    elsewhere ``"select"`` (every row computed, no branch to pay for). Measured on an H200
    (`benchmarks/speed.py --scenarios decode_graphs,decode_branches`, 1.1B Llama; benchmarks/README.md):
    the gathered modes never won (their gathers cost more than the rows they skip); at B=32 some
    row keeps nearly every layer's token, and a branch there only adds its routing and node
    (conditional 0.98x against dense, select 1.11x); at batch 1 the conditional node beat the
    host's round trip (topk 1.39x against 1.32x)."""
    branch = "conditional" if conditional else "host"
    if batch == 1:
        return branch
    skips = none_kept_chance is not None and none_kept_chance >= HOST_WHEN_NONE_KEPT
    return branch if skips else "select"


def none_kept(kept: torch.Tensor, real: torch.Tensor) -> float:
    """The chance that no row keeps a MoD layer's token, estimated from the prompt: `kept`
    `[layers, B]` tokens each MoD layer kept per row (at least one layer), `real` `[B]` each row's
    prompt tokens; each row keeps a new token with its prompt's share, independently; averaged
    over the layers."""
    share = kept.double() / real.double().clamp_min(1)
    return float((1 - share).clamp(0, 1).prod(dim=1).mean())


def gather_buckets(batch: int) -> tuple[int, ...]:
    """The row counts a gathered MoD layer is captured for: powers of two below `batch`, and
    `batch` (B=32: 1, 2, 4, 8, 16, 32). The smallest that holds the kept rows runs, so at most
    half of its rows are filler (below one bucket: none run at all)."""
    sizes, n = [], 1
    while n < batch:
        sizes.append(n)
        n *= 2
    return (*sizes, batch)


def route_decision(router, h, positions, layer_index: int, margin: float, length, used, zero_skipped: bool):
    """A MoD layer's decision for the step's tokens (`h` `[B, 1, D]`): `keep` `[B, 1]` and its
    gate (or None), by the router's causal rule on scores lowered by `margin` (a draft's); and the
    lengths its attention reads: `length + 1` for the rows that keep; for the rows that skip 0 if
    `zero_skipped`, else `length` (their work does not run: a branch at batch 1; gathered calls
    read lengths of their own). One function so that with `compile` the routing fuses into one
    kernel (eager: ~8 small ones per MoD layer, which at batch 32 cost what the skipped attention
    saves); `used` is computed from `keep` either way, so that it is in the decision's kernel and
    not a kernel of its own (a skipping layer at batch 1: 1.1 us and a gap, H200)."""
    ctx = RoutingContext(
        layer_index=layer_index, real=None, forced=None, positions=positions, causal=True, training=False
    )
    logits = router.score(h, ctx)
    keep = router.causal_keep(logits - margin if margin else logits, h, ctx).reshape(h.shape[0], 1)
    kept = keep.view(-1)
    used.copy_((length + 1) * kept if zero_skipped else length + kept)
    return keep, router.gate(logits)


#: The share of a batch's rows a MoD layer's attention is split for where its router names none
#: (`expected_readers`).
READ_SHARE = 0.5


def expected_readers(router, batch: int) -> int:
    """How many of `batch` rows are expected to read a MoD layer's K/V in a step where the rows
    that skip read none: the share of tokens its router aims to keep (`target_share`; else
    `READ_SHARE`), at least one row. The split-KV kernel fills the device with those rows' chunks.
    A per-layer constant, not the prompt's measured share: it is fixed where the step compiles."""
    share = READ_SHARE if router.target_share is None else float(router.target_share)
    return max(1, min(batch, math.ceil(batch * share - 1e-9)))


def merge_kept(out, gate, h, keep, length, only_kept: bool) -> None:
    """A MoD layer's gated output into `h` (in place) and its lengths advanced: every row when
    `only_kept` (the branch ran because the token is kept), else only the rows that keep."""
    out = apply_gate(out, gate, h)
    if only_kept:
        h.copy_(out)
        length.add_(1)
    else:
        h.copy_(torch.where(keep.unsqueeze(-1), out, h))  # rows that skip keep their input
        length.add_(keep.view(-1))  # and their K/V slot is not counted


@dataclass
class StepLayer:
    """A layer of the stack as the step calls it: its original forward, bypassing `mod_forward`."""

    module: nn.Module
    forward: Callable  # the layer's original forward (unbound; through torch.compile with `compile`)
    names: LayerCall  # its argument names
    mod: bool
    rotary_key: Any = None  # which of the rotary embeddings it takes (`DecodeParts.rotary_keys`)


class DecodeStep:
    """The buffers of one shape (batch, capacities), the decode step as pieces over them, and
    (on CUDA) its captured graphs. Pieces: `("run", fn)` always runs; `("if", i, fn)` runs MoD
    layer `i` when the `pred` its routing piece left holds (with driver conditional nodes at batch,
    every row's byte: any of them); `("gather", i, fns)` runs the one of MoD layer `i`'s bucket
    calls its routing piece chose (gathered rows), or none. `decoder` is the `GraphedDecoder` that
    owns the step: its model parts and layers. `buffers` maps layer indices to K/V buffers
    `[batch, capacity, Hk, d]` made (and maybe filled) by the caller; the other layers' start zeroed."""

    margin = 0.0  # what the routers' scores are lowered by (a speculative draft's `Draft.margin`)

    def __init__(
        self,
        decoder: Any,
        batch: int,
        capacities: tuple[int, ...],
        new: int,
        mode: str,
        sampling: Sampling | None = None,
        buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        p = decoder.params
        device, dtype = p.device, p.dtype
        self.decoder, self.batch, self.capacities, self.sampling = decoder, batch, capacities, sampling
        buffers = buffers or {}
        pairs = []
        for i, c in enumerate(capacities):
            if i in buffers:
                k, v = buffers[i]
                if k.shape != (batch, c, decoder.kv_heads, decoder.head_dim) or v.shape != k.shape:
                    raise ModAdaptError(
                        f"layer {i}'s K/V buffers are {tuple(k.shape)}, {tuple(v.shape)}; capacity is {c}"
                    )
            else:
                k = torch.zeros(batch, c, decoder.kv_heads, decoder.head_dim, device=device, dtype=dtype)
                v = torch.zeros_like(k)
            pairs.append((k, v))
        self.keys = [k for k, _ in pairs]
        self.values = [v for _, v in pairs]
        dense_length = torch.zeros(batch, dtype=torch.long, device=device)
        self.lengths = [
            torch.zeros(batch, dtype=torch.long, device=device) if layer.mod else dense_length
            for layer in decoder.layers
        ]
        self.dense_length = dense_length
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Each slot's position, for the MoD layers with a sliding window (a dense layer's slot s holds position s)
        self.slot_positions = [
            torch.zeros(batch, c, dtype=torch.long, device=device) if layer.mod and w is not None else None
            for layer, w, c in zip(decoder.layers, decoder.windows, capacities)
        ]
        self.cache = StaticCache(self.keys, self.values, self.lengths, self.slot_positions, self.position)
        self.out = torch.zeros(batch, new, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.steps_done = 0  # decode steps since the prefill (the host's count of `count`)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self._cu_k = {c: cu_q * c for c in set(capacities)}
        self._cu_q = cu_q
        self._grouped_cu_q: dict = {}  # `cu_q * G` for the GQA-packed flash decode, made once per step
        self._used = [torch.zeros(batch, dtype=torch.int32, device=device) for _ in capacities]
        self.live: dict = {}  # tensors passed between pieces (kept referenced across graphs)
        self.flags = self._flags = None  # pinned host copies of each MoD layer's decision ("host", "gather")
        self.graphs: list | None = None  # [(kind, graph, layer)] once captured
        self.mode = mode  # the branches mode (eagerly, "host" and "conditional" check on the host)
        self.gather = mode in GATHER
        if self.gather:
            self.buckets = gather_buckets(batch)
            # A MoD layer's bucket code: 0 (no row keeps) or 1 + the smallest bucket holding the
            # kept rows, counted as the ordered rows kept at these positions (row e is kept iff
            # more than e rows are).
            self._bucket_edges = torch.tensor((0, *self.buckets[:-1]), device=device)
            self._bucket_codes = torch.arange(1, len(self.buckets) + 1, dtype=torch.uint8, device=device)
            mod = [i for i, layer in enumerate(decoder.layers) if layer.mod]
            # per MoD layer: where a gathered row's cache row starts (`cu_k`; the last entry, past
            # every row, only completes the shape flash expects) and its used length
            self._gather_cu_k = {
                i: torch.full((batch + 1,), batch * capacities[i], dtype=torch.int32, device=device) for i in mod
            }
            self._gather_used = {i: torch.zeros(batch, dtype=torch.int32, device=device) for i in mod}
            self._grouped_by_rows = {n: {} for n in self.buckets}  # `grouped_cu_q` per bucket
        self.pieces = self._pieces()
        self._start: tuple | None = None  # what `mark_start` saved: token, position, lengths

    def mark_start(self) -> None:
        """Remember the state the prefill left (first token, positions, lengths) for `rewind`."""
        self._start = (self.token.clone(), self.position.clone(), [n.clone() for n in self.lengths])

    def rewind(self) -> None:
        """Back to the state `mark_start` saved. The prompt's K/V are untouched (decode steps
        write each row's new K/V past its prompt's slots, and the next steps overwrite them), so
        decoding again gives what decoding after the prefill gave."""
        if self._start is None:
            raise ModAdaptError("this step was not prefilled: nothing to rewind to.")
        token, position, lengths = self._start
        self.token.copy_(token)
        self.position.copy_(position)
        for n, start in zip(self.lengths, lengths):  # dense layers share one tensor: copied alike
            n.copy_(start)
        self.out.zero_()
        self.count.zero_()
        self.steps_done = 0

    @property
    def stitched(self) -> bool:
        """Conditional branches captured as driver graphs (`_capture_stitched`): this torch has no
        conditional nodes of its own."""
        return self.mode in CONDITIONAL and self.decoder.cuda_graphs and not torch_conditional_nodes()

    @property
    def runs_only_when_kept(self) -> bool:
        """Batch 1 with the MoD work behind a branch: it runs only for a kept token (no `where`)."""
        return self.batch == 1 and self.mode in ("conditional", "host")

    def _lengths(self, i: int, add: bool = True) -> KeyLengths:
        """Layer `i`'s lengths as its attention reads them; `add`: fill `used` here (else the
        routing does)."""
        used = torch.add(self.lengths[i], 1, out=self._used[i]) if add else self._used[i]  # add, narrow to int32
        return KeyLengths(
            used,
            self._cu_q,
            self._cu_k[self.capacities[i]],
            grouped_cu_q=self._grouped_cu_q,
            window=self.decoder.windows[i],
            positions=self.position,
            slot_positions=self.slot_positions[i],
        )

    def _pieces(self) -> list:
        d, pieces = self.decoder, [("run", self._begin)]
        for i, layer in enumerate(d.layers):
            if layer.mod:
                pieces += self._mod_pieces(i)
            else:
                pieces.append(("run", functools.partial(self._dense, i)))
        return pieces + [("run", self._end)]

    def _mod_pieces(self, i: int) -> list:
        """MoD layer `i`: its routing, then its work: `("if", i, fn)`, or with gathered rows
        `("gather", i, [fn per bucket])` (one runs: the bucket the routing chose, or none)."""
        route = ("run", functools.partial(self._route, i))
        if self.gather:
            return [route, ("gather", i, [functools.partial(self._gathered, i, n) for n in self.buckets])]
        return [route, ("if", i, functools.partial(self._body, i))]

    # --- the pieces ---------------------------------------------------------------------------
    def _begin(self) -> None:
        d, live = self.decoder, self.live
        live["h"] = d.embed(self.token, self.position)
        live["pe"] = d.position_embeddings(live["h"], self.position)
        for window, i in d.first_dense_by_window.items():  # the dense layers share lengths per window
            live[("dense", window)] = self._lengths(i)

    def _dense(self, i: int) -> None:
        d, live = self.decoder, self.live
        live["h"] = self._call(d.layers[i], live["h"], live[("dense", d.windows[i])], live["pe"])

    def _route(self, i: int) -> None:
        layer, live, B = self.decoder.layers[i], self.live, self.batch
        lengths = self._lengths(i, add=False)
        # rows that skip read no K/V (their result is dropped), unless only a kept token runs it
        zero = not self.gather and not self.runs_only_when_kept
        keep, gate = self.decoder.route_decision(
            layer.module.router, live["h"], self.position, i, self.margin, self.lengths[i], lengths.used, zero
        )
        live[("keep", i)], live[("gate", i)] = keep, gate
        if self.gather:
            self._order_rows(i, keep.view(-1))
            return
        if zero and B > 1:
            lengths.readers = expected_readers(layer.module.router, B)
        if self.mode == "select":  # no branch: the layer always runs
            pred = None
        elif B == 1:
            live[("pred", i)] = pred = keep.reshape(())
        elif self.stitched:  # the condition kernel reads every row's byte (no `any` kernel)
            live[("pred", i)] = pred = keep.view(-1)
        else:
            live[("pred", i)] = pred = keep.any()
        if self.flags is not None:  # the decision's byte (bool viewed as uint8: no kernel) to the host
            self.flags[i].copy_(pred.view(torch.uint8), non_blocking=True)
        live[("lengths", i)] = lengths

    def _order_rows(self, i: int, kept: torch.Tensor) -> None:
        """Gathered rows: the kept rows first (`order`, stable), the bucket code (to the host's
        pinned byte with "gather"; one predicate per bucket with "gather-conditional"), and what
        any bucket's call reads as prefixes of `[B]` tensors: each row's flat K/V slot, its used
        length (0 for the rows that skip), its cache row's start. The layer's lengths advance
        here, after their values were read: the bucket's call writes at the slots, not lengths."""
        live, length, capacity, B = self.live, self.lengths[i], self.capacities[i], self.batch
        in_order, order = torch.sort(kept.view(torch.uint8), descending=True, stable=True)
        kept_in_order = in_order.view(torch.bool)  # the first `count` true
        code = kept_in_order.index_select(0, self._bucket_edges).sum(dtype=torch.uint8)
        live[("bucket", i)] = code
        if self.flags is not None:
            self.flags[i].copy_(code, non_blocking=True)
        if self.mode == "gather-conditional":
            live[("take", i)] = (code == self._bucket_codes).unbind()  # 0-dim views, one per bucket
        at = length.index_select(0, order)  # each ordered row's next slot
        live[("order", i)], live[("kept", i)] = order, kept_in_order
        live[("slots", i)] = torch.add(at, order, alpha=capacity)
        live[("used", i)] = used = self._gather_used[i]
        torch.addcmul(kept_in_order, at, kept_in_order, out=used)  # at + 1 for the kept rows, else 0
        torch.mul(order, capacity, out=self._gather_cu_k[i][:B])
        length.add_(kept)

    def _gathered(self, i: int, n: int) -> None:
        """MoD layer `i` on the first `n` ordered rows (the kept ones, then filler rows that skip)."""
        live, layer = self.live, self.decoder.layers[i]
        h, rows = live["h"], live[("order", i)][:n]
        part = h.index_select(0, rows)
        position = self.position.index_select(0, rows)
        lengths = KeyLengths(
            live[("used", i)][:n],
            self._cu_q[: n + 1],
            self._gather_cu_k[i][: n + 1],
            grouped_cu_q=self._grouped_by_rows[n],
            window=self.decoder.windows[i],
            positions=position,
            slot_positions=self.slot_positions[i],
            rows=rows,
        )
        cache = GatheredCache(self.keys, self.values, live[("slots", i)][:n], self.slot_positions, position)
        out = self._call(layer, part, lengths, live["pe"], cache=cache, rows=rows)
        gate = live[("gate", i)]
        out = apply_gate(out, None if gate is None else gate.index_select(0, rows), part)
        h.index_copy_(0, rows, torch.where(live[("kept", i)][:n].view(n, 1, 1), out, part))

    def _body(self, i: int) -> None:
        live = self.live
        h = live["h"]
        out = self._call(self.decoder.layers[i], h, live[("lengths", i)], live["pe"])
        # batch 1 with the branch taken on the device or host: the token is kept
        self.decoder.merge_kept(out, live[("gate", i)], h, live[("keep", i)], self.lengths[i], self.runs_only_when_kept)

    def _end(self) -> None:
        d, h, B = self.decoder, self.live["h"], self.batch
        self.dense_length += 1
        nxt = next_token(d.head(d.norm(h)[:, -1]), self.sampling)
        self.token.copy_(nxt)
        self.position += 1
        self.out.scatter_(1, self.count.expand(B, 1).clamp_max(self.out.shape[1] - 1), nxt)
        self.count += 1

    def _call(self, layer: StepLayer, h, lengths: KeyLengths, pe, cache: StaticCache | None = None, rows=None):
        """The layer on `h`; a gathered call (`rows`: the batch rows of `h`'s rows) takes those
        rows' positions and rotary embeddings, and its own `cache`."""
        c = layer.names
        position = self.position if rows is None else self.position.index_select(0, rows)
        kwargs = {
            c.hidden: h,
            c.mask: lengths,
            c.cache: self.cache if cache is None else cache,
            c.position_ids: position,
        }
        if pe is not None:  # rotary (GPT-2's learned positions were added to the embedding)
            pe = pe if layer.rotary_key is None else pe[layer.rotary_key]
            kwargs["position_embeddings"] = pe if rows is None else tuple(t.index_select(0, rows) for t in pe)
        out = layer.forward(layer.module, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # --- running ------------------------------------------------------------------------------
    def run_eager(self, warm: bool = False) -> None:
        """The step without graphs; `warm` runs every MoD layer's work (so both sides are planned;
        gathered: every bucket's, whose results are scratch, as the warm-up's are)."""
        for piece in self.pieces:
            if piece[0] == "run":
                piece[1]()
            elif piece[0] == "gather":
                if warm:
                    for fn in piece[2]:
                        fn()
                else:
                    code = int(self.live[("bucket", piece[1])])
                    if code:
                        piece[2][code - 1]()
            elif warm or self.mode == "select" or bool(self.live[("pred", piece[1])].any()):
                piece[2]()

    def capture(self) -> None:
        """Warm up on a side stream, then capture. The warm-up writes K/V at each row's first
        slots (the lengths are 0 here); what the buffers held there is put back, so a caller may
        fill buffers before the capture (a prefill in several passes) or after. The random state
        is put back too, so that the warm-up's draws do not shift a sampled generation (the first
        with this step would differ from later ones)."""
        device = self.token.device
        rng = torch.cuda.get_rng_state(device)
        try:
            self._warm_up_and_capture()
        finally:
            torch.cuda.set_rng_state(rng, device)

    def warm_up(self) -> None:
        """Run every piece `_WARM_UPS` times, each MoD layer's work included. The runs write K/V
        at each row's first slots (the lengths are 0 here); what the buffers held there is put
        back. With `compile`, the first run compiles; the others, like everything after them,
        must not."""
        first = [(k[:, :_WARM_UPS].clone(), v[:, :_WARM_UPS].clone()) for k, v in zip(self.keys, self.values)]
        compiler = self.decoder.compiler
        with compiler.compiling():
            self.run_eager(warm=True)
        with compiler.compiled():
            for _ in range(_WARM_UPS - 1):
                self.run_eager(warm=True)
        for (k, v), (k0, v0) in zip(zip(self.keys, self.values), first):
            k[:, :_WARM_UPS].copy_(k0)
            v[:, :_WARM_UPS].copy_(v0)

    def _warm_up_and_capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        if self.stitched:
            self.graphs = self._capture_stitched()
            return
        pieces = self.mode in ("host", "gather")  # captured in pieces, the host deciding between them
        if pieces:
            # uint8 so that a value the GPU never writes (_PENDING) marks "not arrived yet"
            self.flags = torch.full((len(self.decoder.layers),), _PENDING, dtype=torch.uint8, pin_memory=True)
            self._flags = self.flags.numpy()  # polled without the tensor dispatcher
        graphs, pool, group = [], None, []

        def capture(fns):
            nonlocal pool
            graph = torch.cuda.CUDAGraph()
            with self.decoder.compiler.compiled(), torch.cuda.graph(graph, pool=pool):
                for fn in fns:
                    fn()
            pool = graph.pool()  # every graph of the step shares one pool: they replay in capture order
            return graph

        if pieces:
            for piece in self.pieces:
                if piece[0] == "run":
                    group.append(piece[1])
                    continue
                graphs.append(("run", capture(group), None))
                group = []
                if piece[0] == "gather":  # one graph per bucket; the bucket's share the pool too
                    graphs.append(("gather", [capture([fn]) for fn in piece[2]], piece[1]))
                else:
                    graphs.append(("if", capture([piece[2]]), piece[1]))
            graphs.append(("run", capture(group), None))
        else:
            graphs.append(("run", capture([self._captured_step]), None))
        self.graphs = graphs

    def _capture_stitched(self) -> list:
        """Conditional branches without torch's conditional nodes: the step captured in pieces
        (as for "host"), stitched into one driver graph (`driver_graph.ConditionalGraph`) where
        each MoD layer's work (each bucket's, "gather-conditional") is an IF node whose condition
        a kernel at the end of the routing piece sets from the decision's byte. A sampled step's
        last piece (the token pick) stays a torch graph replayed after it: torch advances the
        random stream's offsets only in its own `replay`."""
        stitched, pool, group, kept = driver_graph.ConditionalGraph(), None, [], []

        def capture(fns, keep: bool = True):
            nonlocal pool
            graph = torch.cuda.CUDAGraph(keep_graph=True) if keep else torch.cuda.CUDAGraph()
            with self.decoder.compiler.compiled(), torch.cuda.graph(graph, pool=pool):
                for fn in fns:
                    fn()
            pool = graph.pool()
            kept.append(graph)  # the stitched graph's nodes are copies that use these graphs' memory
            return graph

        def set_conditions(kind: str, i: int, handles: list) -> None:
            """After MoD layer `i`'s routing: each body's condition from the decision it left."""
            flags = self.live[("take", i)] if kind == "gather" else [self.live[("pred", i)]]
            for handle, flag in zip(handles, flags):
                stitched.set_condition(handle, flag)

        for piece in self.pieces:
            if piece[0] == "run":
                group.append(piece[1])
                continue
            kind, i = piece[0], piece[1]
            bodies = piece[2] if kind == "gather" else [piece[2]]
            handles = [stitched.condition() for _ in bodies]
            stitched.add(capture([*group, functools.partial(set_conditions, kind, i, handles)]))
            group = []
            for handle, body in zip(handles, bodies):
                stitched.add_if(handle, capture([body]))
        end = None
        if self.sampling is None:
            stitched.add(capture(group))
        else:
            end = capture(group, keep=False)
        stitched.instantiate()
        self._stitched_pieces = kept
        return [("stitched", stitched, None)] + ([("run", end, None)] if end is not None else [])

    def _captured_step(self) -> None:
        """The whole step in one capture: MoD work in conditional nodes (one per bucket with
        "gather-conditional": the one whose predicate holds runs), or always run ("select")."""
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph() if self.mode in CONDITIONAL else None
        for piece in self.pieces:
            if piece[0] == "run":
                piece[1]()
            elif graph is None:
                piece[2]()  # "select": computed for every row, `where` keeps the skipping rows' input
            else:
                bodies = piece[2] if piece[0] == "gather" else [piece[2]]
                preds = self.live[("take", piece[1])] if piece[0] == "gather" else [self.live[("pred", piece[1])]]
                for pred, body in zip(preds, bodies):
                    graph.begin_capture_to_if_node(pred)
                    try:
                        body()
                    finally:
                        graph.end_capture_to_conditional_node()

    def replay(self) -> None:
        """One step. With "host" branches the host waits once per MoD layer for the decision's
        byte (polling pinned memory is quicker than a stream sync) and replays the layer's graph
        or not ("gather": the chosen bucket's graph, or none); the GPU idles from the routing
        piece's end until the next graph starts, the overhead `benchmarks/speed.py` prices
        (decode_graphs)."""
        flags = self._flags
        if flags is not None:
            flags.fill(_PENDING)
        for kind, graph, layer in self.graphs:
            if kind == "run":
                graph.replay()
            elif kind == "stitched":
                graph.launch()
            else:
                spins = 0
                while flags[layer] == _PENDING:  # the copy lands after every earlier node ran
                    spins += 1
                    if spins > 1_000_000:  # slow, or the GPU failed: wait for it properly
                        torch.cuda.current_stream().synchronize()
                        if flags[layer] == _PENDING:
                            raise ModAdaptError(f"MoD layer {layer}'s decision never reached the host")
                code = int(flags[layer])
                if code:
                    (graph[code - 1] if kind == "gather" else graph).replay()
