"""The split-KV decode attention (`modadapt.decoding.split_kv`) against its torch reference.

On CPU the Triton kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, read when the kernel
module is imported, hence a subprocess): outputs, which slots it reads (every slot outside a
row's range holds NaN), chunked and single-pass, and graphed decoding through it giving
`model.generate`'s tokens. On the GPU machine the compiled kernel is checked the same way in bf16:
`python -m pytest tests/test_split_kv.py -k cuda`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modadapt.decoding import split_kv

needs_triton = pytest.mark.skipif(split_kv.triton is None, reason="Triton is not installed")
TESTS = Path(__file__).parent


def _interpreted(script: str) -> dict:
    """Runs `script` (which prints one JSON line last) with Triton's interpreter; its result."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = """
import json, torch
from modadapt.decoding import split_kv

_empty = torch.empty
SCRATCH = [float("nan")]
def filled_empty(*args, **kwargs):  # the kernels' scratch starts as NaN, then as a number: what a chunk
    t = _empty(*args, **kwargs)    # leaves unwritten is never read, nor taken for a result by a mask
    return t.fill_(SCRATCH[0]) if t.is_floating_point() else t
torch.empty = filled_empty

def case(B, H, Hk, d, capacity, dtype, sms, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = B + 2  # the cache has rows no query reads
    k = torch.full((rows * capacity, Hk, d), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    used = torch.randint(0, capacity + 1, (B,), generator=gen, dtype=torch.int32)
    used[0] = capacity
    if B > 1:
        used[1] = 0
    if B > 4:
        used[2:4] = 0
    order = torch.randperm(rows, generator=gen)[:B].to(torch.int32)  # each query row reads some cache row
    start = torch.randint(0, 5, (B,), generator=gen, dtype=torch.int32).clamp_max(capacity - used)  # a window's offset
    cu_k = torch.cat([order * capacity + start, torch.tensor([rows * capacity], dtype=torch.int32)])
    for b in range(B):  # only the slots a row reads hold numbers
        lo, n = int(cu_k[b]), int(used[b])
        k[lo : lo + n] = torch.randn(n, Hk, d, generator=gen).to(dtype)
        v[lo : lo + n] = torch.randn(n, Hk, d, generator=gen).to(dtype)
    out = split_kv.decode_attention(q, k, v, cu_k, used, None, capacity, sms)
    # split for one reading row (a MoD layer at batch): more chunks, the same result
    few = split_kv.decode_attention(q, k, v, cu_k, used, None, capacity, sms, 1)
    ref = split_kv.reference(q, k, v, cu_k, used, d**-0.5)
    chunks = split_kv.splits(B, Hk, capacity, sms)
    few_chunks = split_kv.splits(1, Hk, capacity, sms, split_kv.READER_FILL, split_kv.READER_MIN_CHUNK)
    # no row reading, split for one: zeros
    none = split_kv.decode_attention(q, k, v, cu_k, torch.zeros_like(used), None, capacity, sms, 1)
    return dict(shape=[B, H, Hk, d, capacity, str(dtype), sms], chunks=chunks, finite=bool(out.isfinite().all()),
                diff=float((out.float() - ref.float()).abs().max()), empty_row_zero=B < 2 or bool((out[1] == 0).all()),
                few_diff=float((few.float() - ref.float()).abs().max()), few_chunks=few_chunks,
                # the grid's rows found in the kernel: 2 program rows for the reading ones
                compacted=few_chunks > 1 and B > split_kv.READER_ROWS, few_readers=int((used > 0).sum()),
                none_zero=bool((none == 0).all()))

results = []
for B, H, Hk, d, capacity in [(1, 8, 2, 64, 300), (3, 8, 2, 32, 520), (4, 4, 4, 64, 130), (2, 16, 1, 16, 257),
                              (6, 8, 2, 32, 300)]:
    for dtype in (torch.float32, torch.float16):
        for sms in (1, 132):  # one pass, and chunks combined
            results.append(case(B, H, Hk, d, capacity, dtype, sms, seed=len(results)))
SCRATCH[0] = 7.0
results.append(case(6, 8, 2, 32, 300, torch.float32, 132, seed=0))
print(json.dumps(results))
"""


@needs_triton
def test_kernel_matches_its_reference_and_reads_only_the_rows_slots():
    """Every case: finite output (slots outside `cu_k[b] + [0, used[b])` hold NaN), equal to the
    reference up to rounding, zeros for a row without keys; chunked (S > 1) and single-pass cases
    both run; grouped heads (G = 4, 16) and G = 1. Split for one reading row: the same, from a
    grid of `READER_ROWS` program rows that find the reading rows (more of them than program rows
    among the cases: taken in turn), and zeros where no row reads."""
    results = _interpreted(CASES)  # the last case's scratch starts as 7.0
    assert {r["chunks"] > 1 for r in results} == {True, False}
    assert any(r["few_chunks"] > r["chunks"] for r in results)  # split for fewer rows: more chunks
    assert any(r["compacted"] and r["few_readers"] > split_kv.READER_ROWS for r in results)
    for r in results:
        tolerance = 1e-5 if "float32" in r["shape"][5] else 2e-3
        assert r["finite"] and r["empty_row_zero"] and r["none_zero"], r
        assert r["diff"] < tolerance and r["few_diff"] < tolerance, r


DECODING = """
import json, torch
from conftest import build_tiny, build_windowed, greedy, left_pad_batch, make_ids, routed
from modadapt.decoding import GraphedDecoder, split_kv

calls = []  # each call's `readers` (the rows it splits for; None: all)
kernel = split_kv.decode_attention
# split as on a GPU of 132 multiprocessors (on CPU the step passes 1: no chunks), so that the chunks,
# their combination and the compacted grid of rows run
split_kv.decode_attention = lambda *a, **k: calls.append(k.get("readers")) or kernel(*a[:7], 132, **k)
split_kv.BLOCK_N = 32  # and in blocks short enough for the tiny models' caches to take several
x, mask, _ = left_pad_batch([make_ids(1, n, seed=n)[0] for n in (7, 12, 4)])
results = []
for name, model, branches in [
    ("llama threshold-p", routed(build_tiny("llama")), "auto"),
    ("llama topk gathered", routed(build_tiny("llama"), "topk"), "gather"),
    ("llama topk select", routed(build_tiny("llama"), "topk"), "select"),  # 1 row expected: a compacted grid
    ("mistral window 8", routed(build_windowed("mistral", 8)), "auto"),
]:
    for rows in (1, 3):
        expected = greedy(model, x[:rows], mask[:rows], 24)
        got = GraphedDecoder(model, branches=branches).generate(x[:rows], attention_mask=mask[:rows], max_new_tokens=24)
        results.append(dict(case=name, rows=rows, equal=bool(torch.equal(got, expected))))
print(json.dumps(dict(results=results, calls=len(calls), readers=sorted({r for r in calls if r is not None}))))
"""


@needs_triton
def test_graphed_decoding_through_the_kernel_gives_generates_tokens():
    """The decode step's attention through the kernel (interpreted, float32; split as for 132
    multiprocessors, in blocks of 32 keys, so that the tiny caches take several chunks): batch 1 and a
    left-padded batch, gathered rows (`cu_k` of the rows a gathered call reads) and a sliding
    window (reads from the window's first slot) give `model.generate`'s greedy tokens. The MoD
    layers at batch 3 split for the rows expected to read: 2 (threshold-p, target share 0.5), 1
    (topk, 0.125: a grid of `READER_ROWS` = 2 program rows that find the reading rows)."""
    out = _interpreted(DECODING)
    assert out["calls"] > 0
    assert out["readers"] == [1, 2]
    for r in out["results"]:
        assert r["equal"], r


def test_chunks_fill_the_device_and_hold_min_chunk_blocks(monkeypatch):
    block = split_kv.BLOCK_N
    assert split_kv.splits(1, 8, 2048, 132) == 2048 // (split_kv.MIN_CHUNK * block)  # batch 1: as the keys allow
    monkeypatch.setattr(split_kv, "MIN_CHUNK", 2)
    assert split_kv.splits(1, 8, 2048, 132) == 2048 // (2 * block)
    assert split_kv.splits(128, 8, 2048, 132) == 1  # enough programs without chunks
    assert split_kv.splits(8, 8, 32768, 132) == 5  # 64 programs: five chunks each fill the device twice
    assert split_kv.splits(1, 8, 10, 132) == 1
    # few (row, K/V head) pairs fill the device FEW_FILL times: batch 1 at 32k context, 8 K/V heads
    assert split_kv.FEW_PAIRS >= 8
    assert split_kv.splits(1, 8, 32768, 132) == -(-split_kv.FEW_FILL * 132 // 8)
    assert split_kv.splits(1, 8, 32768, 132) == split_kv.splits(1, 8, 32768, 132, split_kv.FEW_FILL)
    assert split_kv.splits(2 * split_kv.FEW_PAIRS, 1, 32768, 132) == split_kv.splits(32, 1, 32768, 132, split_kv.FILL)
    # a MoD layer's few readers: filled READER_FILL times, chunks of READER_MIN_CHUNK blocks at least
    assert split_kv.splits(4, 8, 18432, 132, split_kv.READER_FILL, split_kv.READER_MIN_CHUNK) == 17
    assert split_kv.splits(1, 8, 4608, 132, split_kv.READER_FILL, split_kv.READER_MIN_CHUNK) == 4608 // (2 * block)


@pytest.mark.skipif(not torch.cuda.is_available() or split_kv.triton is None, reason="runs the Triton kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_its_reference_on_cuda(dtype):
    """The compiled kernel on the GPU, chunked and not, against the reference; NaN outside the rows' slots."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hk, d, capacity = 5, 32, 8, 64, 1000
    k = torch.full((B * capacity, Hk, d), float("nan"))
    v = torch.full_like(k, float("nan"))
    used = torch.tensor([1000, 0, 1, 517, 64], dtype=torch.int32)
    cu_k = torch.arange(B + 1, dtype=torch.int32) * capacity
    for b in range(B):
        n = int(used[b])
        k[b * capacity : b * capacity + n] = torch.randn(n, Hk, d, generator=gen)
        v[b * capacity : b * capacity + n] = torch.randn(n, Hk, d, generator=gen)
    q = torch.randn(B, H, d, generator=gen)
    q, k, v, cu_k, used = (t.cuda() for t in (q, k, v, cu_k, used))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    reference = split_kv.reference(q, k, v, cu_k, used, d**-0.5).float()
    for sms in (1, 132):
        out = split_kv.decode_attention(q, k, v, cu_k, used, None, capacity, sms).float()
        assert out.isfinite().all() and (out[1] == 0).all()
        torch.testing.assert_close(
            out,
            reference,
            rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
            atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
        )


def test_wide_heads_and_mixed_dtypes_are_left_to_flash(monkeypatch):
    """Heads wider than `MAX_HEAD_BYTES` (their K/V blocks would not fit shared memory everywhere),
    a cache in another dtype than the query and head sizes that are not powers of two are not the
    kernel's; neither is a CPU tensor outside Triton's interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not split_kv.available(torch.zeros(1, 4, 64))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    widest = split_kv.MAX_HEAD_BYTES // 4  # float32
    for query, key, expected in [
        (torch.zeros(1, 4, 64), torch.zeros(1, 4, 64), True),
        (torch.zeros(1, 4, widest), torch.zeros(1, 4, widest), True),
        (torch.zeros(1, 4, 2 * widest), torch.zeros(1, 4, 2 * widest), False),
        (torch.zeros(1, 4, 2 * widest).half(), torch.zeros(1, 4, 2 * widest).half(), True),
        (torch.zeros(1, 4, 64), torch.zeros(1, 4, 64).half(), False),
        (torch.zeros(1, 4, 48), torch.zeros(1, 4, 48), False),
    ]:
        assert split_kv.available(query, key) == (expected and split_kv.triton is not None), (query.shape, key.dtype)


def test_a_kernel_that_fails_falls_back_once_and_a_later_failure_raises(monkeypatch):
    """A first failure on some tensors (Triton cannot compile or launch) sends those tensors to
    the next path for good (`fallback.tried`); once the kernel has run on such tensors, a
    failure is a real error."""
    from modadapt.decoding import static_cache

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(static_cache, "_SPLIT_KV", {})
    monkeypatch.setattr(split_kv, "available", lambda q, k=None: True)
    monkeypatch.setattr(split_kv, "decode_attention", failing)
    B, H, Hk, d, cap = 2, 4, 2, 16, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, d, generator=gen)
    k, v = torch.randn(B, cap, Hk, d, generator=gen), torch.randn(B, cap, Hk, d, generator=gen)
    cu = torch.arange(B + 1, dtype=torch.int32)
    lengths = static_cache.KeyLengths(torch.tensor([3, 8], dtype=torch.int32), cu, cu * cap)
    masked = static_cache.static_cache_attention(q, k, v, lengths, d**-0.5)
    key = static_cache.flash_key(q)
    assert calls == [1] and static_cache._SPLIT_KV == {key: False}
    assert torch.equal(static_cache.static_cache_attention(q, k, v, lengths, d**-0.5), masked)
    assert calls == [1]  # not tried again
    static_cache._SPLIT_KV[key] = True  # as if it had run on such tensors before
    with pytest.raises(RuntimeError, match="out of resources"):
        static_cache.static_cache_attention(q, k, v, lengths, d**-0.5)
