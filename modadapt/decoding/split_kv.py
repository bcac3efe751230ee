"""Split-KV decode attention (flash-decoding) in Triton, over the static per-row cache.

One query token per row (`[B, H, d]`) against each row's used slots of a flattened cache
`[slots, Hk, d]`: row b reads slots `[cu_k[b], cu_k[b] + used[b])`, the interface of torch's flash
varlen call (`static_cache.flash_varlen`), so gathered calls and sliding windows read the same
slots through it. Why a kernel of our own (issue 17's profile, 1.1B Llama on an H200): torch's
flash decode gives each query head its own block, so every K/V head is read G times (G query
heads per K/V head) or, packed, with too few blocks to fill the device; at batch 1 and 2k context
its split-KV pair of kernels took 13 us per layer to read 4 MB.

Here a program reads one K/V head of one row for all G query heads of its group, over one of
`S` chunks of the row's slots (S fills the device: `splits`); a second kernel combines the chunks
by their log-sum-exp. With S = 1 the first writes the output itself. Each row's used slots are
cut into its S chunks (whole key blocks), not the capacity: a MoD layer's rows keep different
shares, and cut by the capacity a short row left some of its programs empty while each of the
others read as much as a full row's; an empty chunk loads nothing. Rows with no used slot give
zeros (flash's convention), so a row that skips a MoD layer costs nothing and yields no NaN.
Where most rows read nothing (a MoD layer at batch: only the rows that keep the token read), the
chunks are split for the rows expected to read (`readers`): split for every row, the few that
read run in too few programs to read at bandwidth (an H200 at batch 32, 2k context, half the rows
reading 8 us worth of bytes: 18-22 us split for all rows, 14-21 split for half). Where those are
fewer than half the batch, the grid has rows for twice their count only (`READER_ROWS`), whose
programs find the reading rows from `used` themselves (a prefix count over the batch), so the rows
that read nothing launch no programs.
`reference` is the same computation in torch, which the tests hold the kernel to.
"""

from __future__ import annotations

import os

import torch

from ..errors import ModAdaptError

# Tuned on an H200 (benchmarks/decode_attention.py; benchmarks/README.md): 128 keys per step and
# 4 warps were fastest or within 13% of the fastest setting at batch 1-128, 2k-32k context.
BLOCK_N = 128  # keys per inner step
NUM_WARPS = 4
NUM_STAGES = 2
FILL = 2  # programs per multiprocessor the chunks aim at
MIN_CHUNK = 1  # key blocks a chunk holds at least (`splits`; 2k context, batch 1: 5.1 us against 6.1 with 2)
# Up to FEW_PAIRS (row, K/V head) pairs the chunks fill the device FEW_FILL times: each pair's
# chunks then are the only work, and shorter ones keep more bytes in flight (H200, batch 1 at 32k
# context, 8 K/V heads: 22.4 us against 24.5, twice in two sweeps; from batch 8 (64 pairs) up fill
# 4 was as fast or slower: batch 32 at 2k 40.8 us against 38.0)
FEW_PAIRS = 16
FEW_FILL = 4
# The same two where a few rows read (a MoD layer at batch, `readers`): more programs hide the
# latency of their short, uneven rows (H200, 8 rows of 18k slots, 2/4/6 reading: 11%/6%/7% faster
# than filling twice), but a chunk of one block costs more than it hides (one row of 4.6k slots
# reading: 11.4 us in 36 chunks, 9.9 in 18)
READER_FILL = 4
READER_MIN_CHUNK = 2
# ...and the grid holds READER_ROWS times the expected readers' rows, not every row: the programs
# of the rows that read nothing held the multiprocessors' slots for a load and a store each (an
# H200, 8 rows of 4.6k slots, one reading: ~10 us where one row of 2k alone takes 5.4); twice the
# expected count, so that a step where more rows read than expected does not run them in turn
READER_ROWS = 2
_LOG2E = 1.4426950408889634

try:  # Triton ships with torch's CUDA wheels; without it the flash path runs instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without Triton
    triton = None


#: Row bytes of one head (head size x element size) up to which the kernel runs: its K and V
#: blocks then need at most ~41 KB of shared memory (bf16 with head size 128; Triton's count for
#: sm_90), within every GPU since Volta. Wider heads (float32 at 128, half at 256) go to flash.
MAX_HEAD_BYTES = 256


def available(query: torch.Tensor, key: torch.Tensor | None = None) -> bool:
    """Whether the kernel runs for this query (and cache): Triton on CUDA (or its interpreter),
    half precision or float32 (the cache's dtype the query's), a head size of at least 16 that is
    a power of two and at most `MAX_HEAD_BYTES` per head."""
    d = query.shape[-1]
    return (
        triton is not None
        and (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (key is None or key.dtype == query.dtype)
        and 16 <= d
        and d & (d - 1) == 0
        and d * query.element_size() <= MAX_HEAD_BYTES
    )


def splits(rows: int, kv_heads: int, capacity: int, multiprocessors: int, fill=None, least=None) -> int:
    """Chunks per (row, K/V head): enough programs to fill the device `fill` times (`FILL`, or
    `FEW_FILL` for at most `FEW_PAIRS` pairs), no chunk shorter than `least` key blocks
    (`MIN_CHUNK`), at least one."""
    pairs = max(1, rows * kv_heads)
    if fill is None:
        fill = FEW_FILL if pairs <= FEW_PAIRS else FILL
    most = max(1, -(-capacity // ((MIN_CHUNK if least is None else least) * BLOCK_N)))
    want = -(-fill * multiprocessors // pairs)
    return max(1, min(most, want))


def reference(q, k, v, cu_k, used, scale: float) -> torch.Tensor:
    """What the kernel computes, in torch: `q` `[B, H, d]`, `k`/`v` `[slots, Hk, d]`, row b's
    keys at slots `cu_k[b] + [0, used[b])`; float32 softmax; zeros for a row without keys."""
    B, H, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    out = torch.zeros(B, H, d, dtype=torch.float32, device=q.device)
    for b in range(B):
        n, start = int(used[b]), int(cu_k[b])
        if n == 0:
            continue
        kb = k[start : start + n].float().transpose(0, 1)  # [Hk, n, d]
        vb = v[start : start + n].float().transpose(0, 1)
        qb = q[b].float().view(Hk, G, d)
        scores = qb @ kb.transpose(1, 2) * scale  # [Hk, G, n]
        out[b] = (scores.softmax(-1) @ vb).reshape(H, d)
    return out.to(q.dtype)


def decode_attention(
    q, k, v, cu_k, used, scale: float | None, capacity: int, multiprocessors: int, readers: int | None = None
) -> torch.Tensor:
    """`q` `[B, H, d]` against `k`/`v` `[slots, Hk, d]` (contiguous), row b reading slots
    `cu_k[b] + [0, used[b])` (int32 tensors of at least B entries, `used` at most `capacity`);
    returns `[B, H, d]` in q's dtype. `readers`: how many rows are expected to have used slots
    (default: all B); fewer, and the chunks are split to fill the device `READER_FILL` times with
    those."""
    if triton is None:
        raise ModAdaptError("the split-KV decode attention needs Triton")
    B, H, d = q.shape
    Hk = k.shape[1]
    if H % Hk:
        raise ModAdaptError(f"{H} query heads do not group over {Hk} K/V heads")
    G = H // Hk
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale = d**-0.5 if scale is None else float(scale)
    capacity = max(capacity, 1)
    if readers is None or readers >= B:
        S = splits(B, Hk, capacity, multiprocessors)
    else:
        S = splits(max(1, readers), Hk, capacity, multiprocessors, READER_FILL, READER_MIN_CHUNK)
    widest = -(-capacity // S)  # a full row's chunk, in whole key blocks: S chunks may not all be needed
    S = -(-capacity // (-(-widest // BLOCK_N) * BLOCK_N))
    # the grid's rows: every row, or where few are expected to read, READER_ROWS times those (the
    # reading rows found in the kernel, each program row taking its share of them)
    grid_rows = B if readers is None or S == 1 else min(B, READER_ROWS * max(1, readers))
    out = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
    G_PAD = max(16, 1 << (G - 1).bit_length())
    ieee = q.dtype == torch.float32
    if S == 1:
        part, lse = out, out  # unused: the first kernel writes the output
    else:
        part = torch.empty(B, Hk, S, G, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hk, S, G, dtype=torch.float32, device=q.device)
    _chunk_kernel[(grid_rows, Hk, S)](
        q, k, v, cu_k, used, part, lse, out,
        scale * _LOG2E, B,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        S=S, G=G, G_PAD=G_PAD, D=d, BLOCK=BLOCK_N, DIRECT=S == 1, IEEE=ieee,
        COMPACT=grid_rows < B, B_PAD=max(2, 1 << (B - 1).bit_length()),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if S > 1:
        _combine_kernel[(B, H)](part, lse, out, used, S=S, G=G, D=d, S_PAD=max(2, 1 << (S - 1).bit_length()))
    return out


if triton is not None:

    @triton.jit
    def _chunk_kernel(
        Q, K, V, CU_K, USED, PART, LSE, OUT,
        scale_log2, B,
        sqb, sqh, sks, skh, svs, svh, sob, soh,
        S: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        DIRECT: tl.constexpr, IEEE: tl.constexpr, COMPACT: tl.constexpr, B_PAD: tl.constexpr,
    ):  # fmt: skip
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        if COMPACT:  # program row r takes the reading rows of rank r, r + grid rows, ...
            rows = tl.arange(0, B_PAD)
            reads = (tl.load(USED + rows, mask=rows < B, other=0) > 0).to(tl.int32)
            rank = tl.cumsum(reads, 0) - 1
            for r in range(tl.program_id(0), tl.sum(reads, 0), tl.num_programs(0)):
                b = tl.sum(tl.where((reads > 0) & (rank == r), rows, 0), 0)
                _chunk(Q, K, V, CU_K, USED, PART, LSE, OUT, scale_log2, b, kvh, s, sqb, sqh, sks, skh, svs, svh,
                       sob, soh, S, G, G_PAD, D, BLOCK, DIRECT, IEEE)  # fmt: skip
        else:
            _chunk(Q, K, V, CU_K, USED, PART, LSE, OUT, scale_log2, tl.program_id(0), kvh, s, sqb, sqh, sks, skh,
                   svs, svh, sob, soh, S, G, G_PAD, D, BLOCK, DIRECT, IEEE)  # fmt: skip

    @triton.jit
    def _chunk(
        Q, K, V, CU_K, USED, PART, LSE, OUT,
        scale_log2, b, kvh, s,
        sqb, sqh, sks, skh, svs, svh, sob, soh,
        S: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        DIRECT: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Row b's chunk s of K/V head kvh: its partial output and log-sum-exp (or, DIRECT, the output)."""
        n = tl.load(USED + b)
        chunk = tl.cdiv(tl.cdiv(n, S), BLOCK) * BLOCK  # this row's slots over its S chunks, whole blocks
        lo = s * chunk
        hi = tl.minimum(lo + chunk, n)
        work = lo < hi  # an empty chunk loads nothing and leaves only its log-sum-exp (-inf)
        start = tl.load(CU_K + b, mask=work, other=0).to(tl.int64)
        g = tl.arange(0, G_PAD)
        dd = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (kvh * G + g)[:, None] * sqh + dd[None, :], mask=(g[:, None] < G) & work, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for n0 in range(lo, hi, BLOCK):
            keys = n0 + tl.arange(0, BLOCK)
            valid = keys < hi
            slot = start + keys.to(tl.int64)
            kk = tl.load(K + slot[:, None] * sks + kvh * skh + dd[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(kk))
            scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            vv = tl.load(V + slot[:, None] * svs + kvh * svh + dd[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m = m_new
        has = l > 0
        o = acc / tl.where(has, l, 1.0)[:, None]
        if DIRECT:
            tl.store(OUT + b * sob + (kvh * G + g)[:, None] * soh + dd[None, :], o.to(OUT.dtype.element_ty),
                     mask=g[:, None] < G)  # fmt: skip
        else:
            base = ((b * tl.num_programs(1) + kvh) * S + s) * G
            tl.store(PART + (base + g)[:, None] * D + dd[None, :], o, mask=(g[:, None] < G) & work)
            tl.store(LSE + base + g, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=g < G)

    @triton.jit
    def _combine_kernel(
        PART, LSE, OUT, USED, S: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        H = tl.num_programs(1)
        kvh = h // G
        g = h % G
        s = tl.arange(0, S_PAD)
        dd = tl.arange(0, D)
        row = ((b * (H // G) + kvh) * S + s) * G + g  # [S_PAD]: this head's entry in each chunk
        has_keys = tl.load(USED + b) > 0  # a compacted grid wrote nothing for a row without keys
        lse = tl.load(LSE + row, mask=(s < S) & has_keys, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
        part = tl.load(PART + row[:, None] * D + dd[None, :], mask=(lse > float("-inf"))[:, None], other=0.0)
        total = tl.sum(w, 0)
        o = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(OUT + (b * H + h) * D + dd, o.to(OUT.dtype.element_ty))
