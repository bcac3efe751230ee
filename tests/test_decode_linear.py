"""The few-row linear kernel of decode steps (`modadapt.decoding.decode_linear`).

On CPU the Triton kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, read when the module
is imported, hence a subprocess), in float16: outputs against the float32 reference (one block
and several, the reduction split or not, a reduction that is not a multiple of the block, a bias,
1 to 64 rows; two and three weights of one input in one launch), the torch function mode that
sends a decode step's `F.linear` calls to it (eagerly and under `torch.compile`), and graphed
decoding through it (compiled: through `fuse_linears`' merged launches). On the GPU machine the compiled
kernel is checked in bfloat16: `python -m pytest tests/test_decode_linear.py -k cuda`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_split_kv import _interpreted

from modadapt.decoding import decode_linear

needs_triton = pytest.mark.skipif(decode_linear.triton is None, reason="Triton is not installed")

CASES = """
import json, torch
from modadapt.decoding import decode_linear

def case(M, N, K, bias, seed, device="cpu", dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=gen).to(dtype).to(device) if bias else None
    out = decode_linear.linear(x.view(M, 1, K), w, b)
    ref = decode_linear.reference(x, w, b).float()
    blocks, splits = decode_linear.plan(M, [N], K, decode_linear.multiprocessors(x.device) if x.is_cuda else 4)
    return dict(case=[M, N, K, bias], blocks=blocks, splits=splits, shape=list(out.shape),
                diff=float((out.view(M, N).float() - ref).abs().max() / ref.abs().max()))

def group(M, ns, K, bias, seed, device="cpu", dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    ws = [(torch.randn(n, K, generator=gen) / K**0.5).to(dtype).to(device) for n in ns]
    bs = [torch.randn(n, generator=gen).to(dtype).to(device) if b else None for n, b in zip(ns, bias)]
    outs = decode_linear._launch(x.view(M, 1, K), ws, bs)
    refs = [decode_linear.reference(x, w, b).float() for w, b in zip(ws, bs)]
    blocks, S, _ = decode_linear.splits(M, ns, K, x.device)
    return dict(case=[M, ns, K, bias], blocks=blocks, splits=S, shapes=[list(o.shape) for o in outs],
                diff=max(float((o.view(M, -1).float() - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs)))

groups = [group(M, ns, K, bias, seed=i) for i, (M, ns, K, bias) in enumerate([
    (1, [32, 16, 16], 1024, [False, True, False]),  # q/k/v-like: three weights, the reduction split
    (3, [100, 30], 300, [True, True]),               # two weights, outputs not multiples of the block
    (5, [200, 33, 7], 256, [False, False, True]),    # three, unsplit
])]

results = [case(M, N, K, bias, seed=i) for i, (M, N, K, bias) in enumerate([
    (1, 1, 2048, False),    # a router's score: one block, the reduction split
    (1, 512, 2048, True),   # a k/v projection
    (3, 100, 300, True),    # outputs and reduction not multiples of the blocks
    (8, 64, 4096, False),   # a long reduction, split
    (64, 48, 512, True),    # the most rows
])]
print(json.dumps(dict(results=results, groups=groups)))
"""


@needs_triton
def test_kernel_matches_its_reference():
    """Every case equals the float32 reference up to float16 rounding; cases with the reduction
    split over programs and without both run."""
    out = _interpreted(CASES)
    results, groups = out["results"], out["groups"]
    assert {r["splits"] > 1 for r in results} == {True, False}
    for r in results:
        M, N = r["case"][:2]
        assert r["shape"] == [M, 1, N] and r["diff"] < 2e-3, r
    # several weights of one input in one launch: each its own output, as it alone gives
    assert {r["splits"] > 1 for r in groups} == {True, False}
    for r in groups:
        M, ns = r["case"][:2]
        assert r["shapes"] == [[M, 1, n] for n in ns] and r["diff"] < 2e-3, r


@pytest.mark.skipif(not torch.cuda.is_available() or decode_linear.triton is None, reason="runs the Triton kernel")
def test_kernel_matches_its_reference_on_cuda():
    scope: dict = {}
    exec(CASES.split("groups = ")[0], scope)
    for i, (M, N, K, bias) in enumerate([(1, 512, 2048, True), (1, 2048, 8192, False), (8, 1, 2048, False)]):
        for dtype in (torch.bfloat16, torch.float16):
            r = scope["case"](M, N, K, bias, seed=i, device="cuda", dtype=dtype)
            assert r["diff"] < 1e-2 and r["splits"] > 1, r
            r = scope["group"](M, [N, 256, 256], K, [bias, False, True], seed=i, device="cuda", dtype=dtype)
            assert r["diff"] < 1e-2, r
    # replayed in a graph, every replay computes the split sums anew
    x = torch.randn(4, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16) / 90
    expected = decode_linear.linear(x, w)
    graph, outs = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        outs.append(decode_linear.linear(x, w))
    for _ in range(50):
        outs[0].zero_()
        graph.replay()
        assert torch.equal(outs[0], expected)
    torch.testing.assert_close(expected.float(), decode_linear.reference(x, w).float(), rtol=1e-2, atol=1e-2)


MODE = """
import json, torch
import torch.nn.functional as F
from modadapt.decoding import decode_linear

calls = []
launch = decode_linear._launch
decode_linear._launch = lambda *a: calls.append(tuple(a[1][0].shape)) or launch(*a)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.SiLU(), torch.nn.Linear(512, 32, bias=False)).half()
x = torch.randn(2, 1, 64, dtype=torch.float16)
out = {}
with torch.inference_mode():
    plain = net(x)
    with decode_linear.FewRowsLinear():
        eager = net(x)
        out["eager_calls"] = list(calls); calls.clear()
        compiled = torch.compile(net.forward, dynamic=False)(x)
        out["compiled_calls"] = list(calls); calls.clear()
        w = net[0].weight
        by_name = F.linear(input=x, weight=w, bias=net[0].bias)  # F.linear called with its arguments named
        out["named_calls"] = list(calls); calls.clear()
        out["named_equal"] = bool(torch.equal(by_name, decode_linear.linear(x, w, net[0].bias)))
        calls.clear()
        net(torch.randn(65, 64, dtype=torch.float16))  # too many rows
        net.float()(x.float())  # float32 on CPU: not the kernel's
        out["other_calls"] = list(calls)
out["eager_diff"] = float((eager - plain).abs().max())
out["compiled_equal"] = bool(torch.equal(compiled, eager))
print(json.dumps(out))
"""


@needs_triton
def test_the_mode_sends_a_steps_few_row_linears_to_the_kernel():
    """Inside `FewRowsLinear`, `F.linear` runs the kernel where `available` says so (both layers
    here: 512 outputs, and 32 outputs of a 512-long reduction), eagerly and compiled (the op is
    one call in the compiled graph, with the eager call's result; arguments passed by name too);
    65 rows and float32 on CPU run `F.linear`."""
    out = _interpreted(MODE)
    assert out["eager_calls"] == [[512, 64], [32, 512]] and out["eager_diff"] < 2e-2, out
    assert out["compiled_calls"] == out["eager_calls"] and out["compiled_equal"], out
    assert out["named_calls"] == [[512, 64]] and out["named_equal"], out
    assert out["other_calls"] == [], out


DECODING = """
import json, torch
from conftest import build_tiny, left_pad_batch, make_ids, routed
from modadapt.decoding import GraphedDecoder, decode_linear

calls = []
launch = decode_linear._launch
decode_linear._launch = lambda *a: calls.append(len(a[1])) or launch(*a)
x, mask, _ = left_pad_batch([make_ids(1, n, seed=n)[0] for n in (7, 12, 4)])
results = []
model = routed(build_tiny("llama")).half()  # dense layers and MoD layers, their routers' scores
for rows in (3,):  # batch 1 runs compiled below
    decode_linear.LINEAR_KERNEL = "cublas"
    before = len(calls)
    plain = GraphedDecoder(model).generate(x[:rows], attention_mask=mask[:rows], max_new_tokens=8)
    assert len(calls) == before
    decode_linear.LINEAR_KERNEL = "triton"
    got = GraphedDecoder(model).generate(x[:rows], attention_mask=mask[:rows], max_new_tokens=8)
    results.append(dict(rows=rows, equal=bool(torch.equal(got, plain))))
# compiled: the calls of one input merged into one launch (`fuse_linears`)
decode_linear.LINEAR_KERNEL = "cublas"
plain = GraphedDecoder(model, compile=True).generate(x[:1], attention_mask=mask[:1], max_new_tokens=8)
decode_linear.LINEAR_KERNEL = "triton"
before = len(calls)
got = GraphedDecoder(model, compile=True).generate(x[:1], attention_mask=mask[:1], max_new_tokens=8)
merged = sorted(set(calls[before:]))  # weights per launch
results.append(dict(rows=1, compiled=True, merged=merged, equal=bool(torch.equal(got, plain))))
print(json.dumps(dict(results=results, calls=len(calls))))
"""


@needs_triton
def test_graphed_decoding_through_the_kernel_gives_the_same_tokens():
    """A tiny converted Llama in float16 (threshold-p; its dense layers, MoD layers and router
    scores all go to the kernel), a left-padded batch, and compiled at batch 1 (q/k/v and gate/up
    merged into one launch each): decoding with the kernel gives the tokens decoding
    with `F.linear` gives (`LINEAR_KERNEL`)."""
    out = _interpreted(DECODING)
    assert out["calls"] > 0
    for r in out["results"]:
        assert r["equal"], r
    assert out["results"][-1]["merged"] == [1, 2, 3], out  # single calls, gate/up and q/k/v


def test_where_the_kernel_runs(monkeypatch):
    """Narrow layers at any row count up to `MAX_ROWS`, long reductions at few rows; not square
    or wide layers; one launch for a group up to `GROUP_ROWS` rows, past them where each weight
    wins alone. The kernel accepts no more than `MAX_ROWS` rows, nothing autograd records, no
    weight of another dtype, no CPU tensor outside the interpreter."""
    assert decode_linear.wins(1, 512, 2048) and decode_linear.wins(64, 1, 2048)
    assert decode_linear.wins(8, 2048, 8192) and not decode_linear.wins(9, 2048, 8192)
    assert not decode_linear.wins(1, 2048, 2048) and not decode_linear.wins(1, 32000, 2048)
    # one launch for a group up to GROUP_ROWS rows, past them only where each weight alone wins
    assert decode_linear.group_wins(decode_linear.GROUP_ROWS, [2048, 512, 512], 2048)
    assert not decode_linear.group_wins(decode_linear.GROUP_ROWS + 1, [2048, 512, 512], 2048)
    assert decode_linear.group_wins(decode_linear.MAX_ROWS, [512, 512], 2048)
    monkeypatch.setattr(decode_linear, "_INTERPRETED", (torch.float16,))
    x, w = torch.zeros(4, 2048, dtype=torch.float16), torch.zeros(512, 2048, dtype=torch.float16)
    assert decode_linear.accepts(x, w) == (decode_linear.triton is not None)
    assert not decode_linear.accepts(torch.zeros(65, 2048, dtype=torch.float16), w)
    assert not decode_linear.accepts(x, w.float())
    assert not decode_linear.accepts(x, w.t().contiguous().t())
    with torch.enable_grad():
        assert not decode_linear.accepts(x, w.clone().requires_grad_())
    monkeypatch.setattr(decode_linear, "_INTERPRETED", ())
    assert not decode_linear.accepts(x, w)


def test_an_unknown_linear_kernel_is_one_clear_error(monkeypatch):
    from conftest import build_tiny

    from modadapt.decoding import GraphedDecoder
    from modadapt.errors import ModAdaptError

    monkeypatch.setattr(decode_linear, "LINEAR_KERNEL", "cutlass")
    with pytest.raises(ModAdaptError, match="LINEAR_KERNEL must be one of triton, cublas, got 'cutlass'"):
        GraphedDecoder(build_tiny("llama"))


def test_a_failing_kernel_falls_back_to_f_linear_once(monkeypatch):
    """Where the kernel fails the first time on some tensors, the op computes `F.linear` from then
    on without trying again; once it has run on such tensors a failure raises."""
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(decode_linear, "_RAN", {})
    monkeypatch.setattr(decode_linear, "_launch", failing)
    x, w = torch.randn(2, 64), torch.randn(16, 64)
    assert torch.equal(decode_linear.linear(x, w), F.linear(x, w)) and calls == [1]
    assert torch.equal(decode_linear.linear(x, w), F.linear(x, w)) and calls == [1]
    decode_linear._RAN[("cpu", torch.float32)] = True
    with pytest.raises(RuntimeError, match="out of resources"):
        decode_linear.linear(x, w)
