"""Decode attention over the static cache on the GPU: flash with one query per head, flash with the
grouped heads packed as G queries per K/V head, and modadapt's split-KV Triton kernel
(`modadapt.decoding.split_kv`), each timed inside a CUDA graph (10 calls per replay), next to the
K/V bytes bound, with the split-KV output's largest difference from its torch reference.

    python benchmarks/decode_attention.py --out results/decode-attention.json     # GPU only
    python benchmarks/decode_attention.py --block 32,64,128 --warps 2,4           # tune split_kv
    python benchmarks/decode_attention.py --shapes 8x18432:4:0.9 --fill 2,4,8     # a MoD layer's call

A shape `BxC[:R[:P]]` is a MoD layer's call at batch: R of the B rows (spread over the batch) read,
each about P of the capacity C (uniform in [0.8P, P]), the rest nothing; the bound counts the
bytes read, and the kernel splits for R readers (`readers`, as a graphed MoD step does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from modadapt.decoding import split_kv
from modadapt.decoding.static_cache import flash_varlen


def graphed_us(fn, replays: int = 20, calls: int = 10) -> float:
    """Microseconds per call of `fn`, captured `calls` times in one graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / calls * 1e3


def shapes(args) -> list[tuple[int, int, int, float]]:
    """(batch, capacity, readers, kept share) to time: `--shapes`, else every context x batch.
    Raises ValueError naming the item that is no `BxC[:R[:P]]` with 1 <= R <= B and 0 < P <= 1."""
    if not args.shapes:
        return [(B, C, B, 1.0) for C in map(int, args.contexts.split(",")) for B in map(int, args.batches.split(","))]
    out = []
    for item in args.shapes.split(","):
        try:
            head, *rest = item.split(":")
            B, C = map(int, head.split("x"))
            R, P = int(rest[0]) if rest else B, float(rest[1]) if len(rest) > 1 else 1.0
            ok = len(rest) <= 2 and B >= 1 and C >= 1 and 1 <= R <= B and 0 < P <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--shapes item {item!r} is not BxC[:R[:P]] with 1 <= R <= B and 0 < P <= 1")
        out.append((B, C, R, P))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="2048,8192,32768")
    p.add_argument("--batches", default="1,4,8,16,32,64")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--bandwidth-tbs", type=float, default=4.2, help="for the bytes bound")
    p.add_argument("--block", default=str(split_kv.BLOCK_N), help="split_kv.BLOCK_N values to time (comma list)")
    p.add_argument("--warps", default=str(split_kv.NUM_WARPS), help="split_kv.NUM_WARPS values to time")
    p.add_argument("--stages", default=str(split_kv.NUM_STAGES), help="split_kv.NUM_STAGES values to time")
    p.add_argument("--min-chunk", help="split_kv.MIN_CHUNK values to time (READER_MIN_CHUNK where a shape has readers)")
    p.add_argument(
        "--reader-rows",
        help="split_kv.READER_ROWS values to time where a shape has readers (the grid's rows per expected "
        "reader; one at least the batch: every row, the grid before the reading rows were found in the kernel)",
    )
    p.add_argument(
        "--fill",
        help="split_kv.FILL values to time (FEW_FILL for few (row, K/V head) pairs, READER_FILL where a shape has readers)",
    )
    p.add_argument("--shapes", help="BxC[:R[:P]] list (comma), instead of --contexts x --batches")
    p.add_argument("--out", help="JSON records")
    args = p.parse_args(argv)
    try:
        todo = shapes(args)
    except ValueError as e:
        p.error(str(e))
    if not torch.cuda.is_available():
        print("decode_attention.py times CUDA kernels; this machine has no CUDA device.", file=sys.stderr)
        return 2
    H, Hk, d, G = args.heads, args.kv_heads, args.head_dim, args.heads // args.kv_heads
    dev, dtype = torch.device("cuda"), torch.bfloat16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"# {torch.cuda.get_device_name(dev)}, {sms} SMs, heads {H}/{Hk}, head size {d}, bf16")
    records = []
    reader_tune = (split_kv.READER_FILL, split_kv.READER_MIN_CHUNK)
    dense_fill = {True: split_kv.FEW_FILL, False: split_kv.FILL}  # by whether the pairs are few
    gen = torch.Generator().manual_seed(0)
    for B, C, R, P in todo:
        k = torch.randn(B * C, Hk, d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        used = torch.full((B,), C - 5, dtype=torch.int32)
        if R < B:  # a MoD layer at batch: R rows read, about P of the capacity each
            share = P * (0.8 + 0.2 * torch.rand(B, generator=gen))
            reads = torch.zeros(B, dtype=torch.bool)
            reads[torch.linspace(0, B - 1, R).round().long()] = True
            used = torch.where(reads, (share * C).int().clamp(1, C), 0).to(torch.int32)
        used = used.to(dev)
        readers = R if R < B else None
        cu_k = torch.arange(B + 1, device=dev, dtype=torch.int32) * C
        cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
        cu_grouped = cu_q * G
        q = torch.randn(B, H, d, device=dev, dtype=dtype)
        packed_q = q.view(B, Hk, G, d).transpose(1, 2).reshape(B * G, Hk, d)
        per_head = graphed_us(lambda: flash_varlen(q, k, v, cu_q, cu_k, 1, C, False, None, used))
        packed = graphed_us(lambda: flash_varlen(packed_q, k, v, cu_grouped, cu_k, G, C, False, None, used))
        bound = 2 * int(used.sum()) * Hk * d * 2 / (args.bandwidth_tbs * 1e12) * 1e6
        record = dict(
            batch=B, context=C, readers=R, used=used.tolist() if R < B else None,
            per_head_us=per_head, packed_us=packed, bound_us=bound, split_kv={},
        )  # fmt: skip
        reference = split_kv.reference(q, k, v, cu_k, used, d**-0.5).float() if B <= 8 else None
        text = []
        few = B * Hk <= split_kv.FEW_PAIRS
        fill_default, least_default = (dense_fill[few], split_kv.MIN_CHUNK) if readers is None else reader_tune
        fills, leasts = args.fill or str(fill_default), args.min_chunk or str(least_default)
        grids = (args.reader_rows or str(split_kv.READER_ROWS)) if readers else "0"  # 0: not a reader shape
        for block, warps, stages, least, fill, grid in itertools.product(
            *(map(int, a.split(",")) for a in (args.block, args.warps, args.stages, leasts, fills, grids))
        ):
            split_kv.BLOCK_N, split_kv.NUM_WARPS, split_kv.NUM_STAGES = block, warps, stages
            split_kv.MIN_CHUNK = split_kv.READER_MIN_CHUNK = least
            split_kv.FILL = split_kv.FEW_FILL = split_kv.READER_FILL = fill
            split_kv.READER_ROWS = grid or split_kv.READER_ROWS
            fn = lambda: split_kv.decode_attention(q, k, v, cu_k, used, None, C, sms, readers)  # noqa: E731
            us = graphed_us(fn)
            err = None if reference is None else float((fn().float() - reference).abs().max())
            key = f"block{block}-warps{warps}-stages{stages}-min{least}-fill{fill}" + (f"-rows{grid}" if grid else "")
            record["split_kv"][key] = dict(us=us, max_abs_diff=err)
            text.append(f"{key} {us:.1f}us" + ("" if err is None else f" (diff {err:.1e})"))
        records.append(record)
        label = f"C{C} B{B}" + (f" R{R}" if readers else "")
        print(
            f"{label}: per-head {per_head:.1f}us packed {packed:.1f}us bound {bound:.1f}us; split-kv "
            + ", ".join(text),
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(dev), "multiprocessors": sms, "records": records}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
