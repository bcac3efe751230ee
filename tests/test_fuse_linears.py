"""The compiled decode step's linear-layer pass (`modadapt.decoding.fuse_linears`).

`merge` and `reduce_narrow` on graphs traced by hand (which calls share an input, which may move;
a narrow call's graph reduction computes what the call did); the whole pass
under `torch.compile` in Triton's interpreter (a subprocess: `TRITON_INTERPRET` is read on import):
the calls of one input run as one launch, split reductions return partial sums that the graph
adds, and the results are the uncompiled calls' up to one rounding; the partial-sums op's
fallback. Graphed decoding through the pass is checked in `test_decode_linear`.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from test_split_kv import _interpreted

from modadapt.decoding import decode_linear, fuse_linears

needs_triton = pytest.mark.skipif(decode_linear.triton is None, reason="Triton is not installed")
single = torch.ops.modadapt.decode_linear.default


def _traced(fn) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(fn)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def test_merge_joins_the_calls_of_one_input_and_keeps_their_results():
    """q/k/v-like calls of one input become one call of three weights, and a fourth call of it
    starts no group of one; two calls through equal views of another input are one input; the
    graph computes what it computed."""

    def fn(x, y, wq, wk, wv, wo, bk):
        h = x * 2
        q, k, v = single(h, wq, None), single(h, wk, bk), single(h, wv, None)
        extra = single(h, wo, None)
        up = single(torch.ops.aten.view.default(y, [2, 1, 8]), wo, None)
        gate = single(torch.ops.aten.view.default(y, [2, 1, 8]), wk, bk)
        return q + 1, k, v, extra, up, gate

    gm = _traced(fn)
    args = [torch.randn(2, 8), torch.randn(2, 8)] + [torch.randn(8, 8) for _ in range(4)] + [torch.randn(8)]
    before = gm(*args)
    assert fuse_linears.merge(gm.graph) == 2
    gm.recompile()
    assert _targets(gm).count(torch.ops.modadapt.decode_linears.default) == 2
    assert _targets(gm).count(single) == 1  # the fourth call of h
    for a, b in zip(gm(*args), before):
        assert torch.equal(a, b)


def test_merge_leaves_a_call_whose_weight_comes_later():
    """A call whose weight is computed after the first call of its input cannot move up to it."""

    def fn(x, wq, wk):
        q = single(x, wq, None)
        late = wk * q.sum()
        return q, single(x, late, None)

    gm = _traced(fn)
    assert fuse_linears.merge(gm.graph) == 0


def test_reduce_narrow_computes_a_narrow_call_in_the_graph():
    """Calls of at most `REDUCED` outputs (with a bias or not) become float32 products and sums
    that give the call's result up to one rounding; a wider call stays."""

    def fn(x, w1, w8, wide, b8):
        return single(x, w1, None), single(x, w8, b8), single(x, wide, None)

    x = torch.randn(2, 1, 64).half()
    ws = [
        torch.randn(1, 64).half(),
        torch.randn(decode_linear.REDUCED, 64).half(),
        torch.randn(decode_linear.REDUCED + 1, 64).half(),
    ]
    b8 = torch.randn(decode_linear.REDUCED).half()
    gm = _traced(fn)
    _fake_vals(gm, x, *ws, b8)
    assert fuse_linears.reduce_narrow(gm.graph) == 2
    gm.recompile()
    assert _targets(gm).count(single) == 1
    got = gm(x, *ws, b8)
    for out, w, b in zip(got, ws, (None, b8, None)):
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
        assert out.dtype == x.dtype and out.shape == ref.shape


def _fake_vals(gm: torch.fx.GraphModule, *args) -> None:
    """Each node's `val` as a fake tensor (the pass reads shapes there, as in inductor's graphs),
    from running the graph on `args`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*args)
    fake = FakeTensorMode()
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if hasattr(tm, "shape"):  # one tensor (the output node's is a tuple)
            node.meta["val"] = fake.from_tensor(torch.empty(tm.shape, dtype=tm.dtype))


COMPILED = """
import json, torch
from torch._inductor import config
from modadapt.decoding import decode_linear, fuse_linears

launches, made = [], []
launch, fuse = decode_linear._launch, fuse_linears.fuse
decode_linear._launch = lambda x, ws, bs, partial=False: launches.append(([w.shape[0] for w in ws], partial)) or launch(x, ws, bs, partial)
fuse_linears.fuse = lambda graph: made.append(fuse(graph))
torch.manual_seed(0)
D = 1024
q, k, v = (torch.nn.Linear(D, n, bias=n == 16).half() for n in (32, 16, 8))
router = torch.nn.Linear(D, 1).half()
wide = torch.nn.Linear(D, 128, bias=False).half()

def step(x, h):
    x = x * 2
    a, b, c = q(x).view(1, 1, 2, 16) * 3, k(x), v(x)
    score = router(h) + h[..., :1]  # one output: a reduction of the graph's own
    return a, b, c, score, wide(h * 3)  # wide: 128 outputs over 8 programs, unsplit

x, h = torch.randn(1, 1, D).half(), torch.randn(1, 1, D).half()
with torch.inference_mode(), decode_linear.FewRowsLinear():
    eager = step(x, h)
    eager_launches = list(launches)
    launches.clear()
    # caches off: a graph that inductor has compiled before would not run the pass again
    with config.patch(post_grad_custom_post_pass=fuse_linears.FuseLinears(), force_disable_caches=True):
        compiled = torch.compile(step, dynamic=False)
        compiled(x, h)
        launches.clear()
        got = compiled(x, h)
        compiled_launches = list(launches)
# the partial sums as an op: split (the router's score) and not (the wide layer: one split)
parts = [decode_linear.partials(h, [m.weight])[0] for m in (router, wide)]
ref = [h.view(1, D).float() @ m.weight.float().t() for m in (router, wide)]
print(json.dumps(dict(
    partial_splits=[p.shape[0] for p in parts],
    partial_diffs=[float((p.sum(0) - r).abs().max() / r.abs().max()) for p, r in zip(parts, ref)],
    made=made, eager_launches=eager_launches, launches=compiled_launches,
    diffs=[float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, eager)],
    shapes=[list(a.shape) == list(b.shape) for a, b in zip(got, eager)],
)))
"""


@needs_triton
def test_the_pass_under_compile_launches_once_per_input_and_leaves_split_sums_to_the_graph():
    """Eagerly: one launch per weight, split sums in the kernel's second launch. Compiled with the
    pass: q/k/v one launch returning partial sums (their reduction split over programs), the
    router's one-output score no launch (a reduction in the graph), the unsplit wide layer its
    outputs; the results are the eager calls' up to one rounding of the last bit. The partial
    sums alone (split and not) add up to the float32 product."""
    out = _interpreted(COMPILED)
    assert out["made"] == [{"reduced": 1, "merged": 1, "split_sums": 1}], out
    assert sorted(map(tuple, [(tuple(ns), p) for ns, p in out["eager_launches"]])) == sorted(
        [((32,), False), ((16,), False), ((8,), False), ((1,), False), ((128,), False)]
    ), out
    assert sorted((tuple(ns), p) for ns, p in out["launches"]) == [((32, 16, 8), True), ((128,), False)]
    assert all(out["shapes"]) and max(out["diffs"]) < 2e-3, out
    assert out["partial_splits"] == [4, 1] and max(out["partial_diffs"]) < 1e-5, out


def test_the_partial_sums_fall_back_to_f_linear(monkeypatch):
    """Where the kernel fails, the partial sums are F.linear's result and zeros: their sum is it."""
    monkeypatch.setattr(decode_linear, "_RAN", {})

    def failing(*args):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(decode_linear, "_launch", failing)
    x, ws = torch.randn(1, 1, 2048), [torch.randn(1, 2048), torch.randn(8, 2048)]
    parts = decode_linear.partials(x, ws)
    S = decode_linear.splits(1, [1, 8], 2048, x.device)[1]
    assert S > 1 and [list(p.shape) for p in parts] == [[S, 1, 1], [S, 1, 8]]
    for p, w in zip(parts, ws):
        torch.testing.assert_close(p.sum(0), F.linear(x.view(1, 2048), w))
