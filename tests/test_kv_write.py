"""The one-kernel K/V write of a decode token (`modadapt.decoding.kv_write`).

On CPU the Triton kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, read when the module
is imported, hence a subprocess): it writes each row's key and value at that row's slot and no
other slot (every other slot holds NaN before and after). Graphed decoding through it is checked
in tests/test_split_kv.py's interpreted decoding (which writes through it) and on the GPU machine:
`python -m pytest tests/test_kv_write.py -k cuda`.
"""

from __future__ import annotations

import pytest
import torch
from test_split_kv import _interpreted

from modadapt.decoding import kv_write, static_cache

needs_triton = pytest.mark.skipif(kv_write.triton is None, reason="Triton is not installed")

CASES = """
import json, torch
from modadapt.decoding import kv_write

def case(B, capacity, Hk, d, dtype, seed, device="cpu", past=False):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.full((B, capacity, Hk, d), float("nan"), dtype=dtype, device=device)
    values = torch.full_like(keys, float("nan"))
    # as the model hands them over: [B, T, Hk, d] projections viewed as [B, Hk, T, d]
    key = torch.randn(B, 1, Hk, d, generator=gen).to(dtype).to(device).transpose(1, 2)
    value = torch.randn(B, 1, Hk, d, generator=gen).to(dtype).to(device).transpose(1, 2)
    at = torch.randint(0, capacity, (B,), generator=gen).to(device)
    if past:  # row 0's slot past the buffer: nothing of it is written
        at[0] = capacity
    ran = kv_write.available(key, keys) and kv_write.write(keys, values, key, value, at)
    written = ~torch.isnan(keys).any(-1).any(-1)  # [B, capacity]
    expected = torch.zeros(B, capacity, dtype=torch.bool, device=device)
    rows = torch.arange(1 if past else 0, B, device=device)
    expected[rows, at[rows]] = True
    return dict(
        ran=bool(ran),
        only_the_slots=bool(torch.equal(written, expected)) and bool(torch.equal(~torch.isnan(values).any(-1).any(-1), expected)),
        keys_equal=bool(torch.equal(keys[rows, at[rows]], key[rows, :, 0])),
        values_equal=bool(torch.equal(values[rows, at[rows]], value[rows, :, 0])),
    )

results = [case(B, capacity, Hk, d, dtype, seed=i)
           for i, (B, capacity, Hk, d) in enumerate([(1, 7, 2, 16), (3, 130, 8, 64), (5, 4, 1, 32)])
           for dtype in (torch.float32, torch.float16)]
results.append(case(3, 5, 2, 16, torch.float32, seed=9, past=True))
print(json.dumps(results))
"""


@needs_triton
def test_the_kernel_writes_each_rows_slot_and_nothing_else():
    """Each row's new key and value land at its slot `at[b]`, bit for bit; every other slot of
    both buffers is untouched (NaN), for several batches, head counts and sizes, float32 and
    float16; a row whose slot is past the buffer writes nothing."""
    for r in _interpreted(CASES):
        assert r == dict(ran=True, only_the_slots=True, keys_equal=True, values_equal=True), r


@pytest.mark.skipif(not torch.cuda.is_available() or kv_write.triton is None, reason="runs the Triton kernel")
def test_the_kernel_writes_each_rows_slot_and_nothing_else_on_cuda():
    scope: dict = {}
    exec(CASES.replace("print(json.dumps(results))", ""), scope)
    for dtype in (torch.bfloat16, torch.float32):
        r = scope["case"](6, 300, 8, 64, dtype, seed=1, device="cuda", past=dtype == torch.float32)
        assert r == dict(ran=True, only_the_slots=True, keys_equal=True, values_equal=True), r


def test_what_the_kernel_takes(monkeypatch):
    """A CPU tensor outside the interpreter, several tokens per row, a cache of another dtype,
    a head size that is not a power of two: the scatters write them."""
    monkeypatch.setattr(kv_write, "_INTERPRETED", (torch.float32,))
    cache = torch.zeros(2, 8, 2, 16)
    assert kv_write.available(torch.zeros(2, 2, 1, 16), cache) == (kv_write.triton is not None)
    assert not kv_write.available(torch.zeros(2, 2, 3, 16), cache)
    assert not kv_write.available(torch.zeros(2, 2, 1, 16), cache.half())
    assert not kv_write.available(torch.zeros(2, 2, 1, 12), torch.zeros(2, 8, 2, 12))
    monkeypatch.setattr(kv_write, "_INTERPRETED", ())
    assert not kv_write.available(torch.zeros(2, 2, 1, 16), cache)


def test_a_failing_kernel_falls_back_to_the_scatters_once(monkeypatch):
    """Where the kernel fails the first time (Triton cannot compile or launch it), `update` writes
    with the scatters, and does so from then on; once it has run on such tensors a failure raises."""
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(kv_write, "_RAN", {})
    monkeypatch.setattr(kv_write, "_INTERPRETED", (torch.float32,))
    monkeypatch.setattr(kv_write, "triton", object())
    monkeypatch.setattr(kv_write, "_launch", failing)
    B, cap, Hk, d = 2, 6, 2, 16
    keys, values = torch.zeros(B, cap, Hk, d), torch.zeros(B, cap, Hk, d)
    lengths = torch.tensor([0, 4])
    cache = static_cache.StaticCache([keys], [values], [lengths])
    key, value = torch.randn(B, Hk, 1, d), torch.randn(B, Hk, 1, d)
    cache.update(key, value, 0)
    assert calls == [1] and kv_write._RAN == {("cpu", torch.float32): False}
    assert torch.equal(keys[[0, 1], [0, 4]], key[:, :, 0]) and torch.equal(values[[0, 1], [0, 4]], value[:, :, 0])
    cache.update(key, value, 0)
    assert calls == [1]  # not tried again
    kv_write._RAN[("cpu", torch.float32)] = True  # as if it had run on such tensors before
    with pytest.raises(RuntimeError, match="out of resources"):
        cache.update(key, value, 0)


@pytest.mark.parametrize("T", [1, 2])
def test_the_traced_write_equals_the_eager_one(T):
    """Under torch.compile (inductor, fullgraph: no break around it) `StaticCache.update` writes
    as graph ops, which inductor fuses into the new K/V's producers: the buffers and a windowed
    layer's slot positions end as the eager write leaves them, one token per row or several."""
    gen = torch.Generator().manual_seed(T)
    B, capacity, Hk, d = 3, 6, 2, 8
    keys = [torch.randn(B, capacity, Hk, d, generator=gen) for _ in range(2)]
    values = [torch.randn(B, capacity, Hk, d, generator=gen) for _ in range(2)]
    lengths = [torch.tensor([0, 3, capacity - T]), torch.tensor([1, 2, 0])]
    positions = torch.tensor([[5], [9], [7]]) + torch.arange(T)
    held = [torch.randint(0, 50, (B, capacity), generator=gen), None]

    def cache():
        return static_cache.StaticCache(
            [k.clone() for k in keys],
            [v.clone() for v in values],
            lengths,
            [h if h is None else h.clone() for h in held],
            positions,
        )

    key = torch.randn(B, T, Hk, d, generator=gen).transpose(1, 2)
    value = torch.randn(B, T, Hk, d, generator=gen).transpose(1, 2)

    def write(c: static_cache.StaticCache) -> static_cache.StaticCache:
        c.update(key * 2, value + 1, 0)  # computed in the graph, as a layer's rotary is
        return c

    traced, eager = cache(), cache()
    torch.compile(write, backend="inductor", fullgraph=True, dynamic=False)(traced)
    write(eager)
    for a, b in zip(traced.keys + traced.values, eager.keys + eager.values):
        assert torch.equal(a, b)
    assert torch.equal(traced.slot_positions[0], eager.slot_positions[0])
    assert not torch.equal(eager.keys[0], keys[0]) and not torch.equal(eager.slot_positions[0], held[0])
