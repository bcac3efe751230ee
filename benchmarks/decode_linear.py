"""Linear layers at decode's few rows on the GPU: cuBLAS (`F.linear`) against modadapt's Triton
kernel (`modadapt.decoding.decode_linear`), each timed inside a CUDA graph (10 calls per replay),
next to the weights' bytes bound, with the kernel's largest difference from its float32 reference.
Shapes: the projections of `speed.py`'s 1.1B Llama (hidden 2048, 8 K/V heads of 64, MLP 8192),
a router's score (one output) and the LM head. `--groups`: the weights of one input that a
compiled step computes in one launch (`decode_linear.linears`): cuBLAS on each, the per-call
choice on each (the kernel where it `wins`, else cuBLAS) and the one launch for all.

    python benchmarks/decode_linear.py --rows 1,8,32 --out results/decode-linear.json      # GPU only
    python benchmarks/decode_linear.py --block-n 16,32 --block-k 128,256 --stages 3,4     # tune
    python benchmarks/decode_linear.py --groups --rows 1,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_attention import graphed_us

from modadapt.decoding import decode_linear

SHAPES = {  # name: (outputs, inputs)
    "q/o proj": (2048, 2048),
    "k/v proj": (512, 2048),
    "gate/up proj": (8192, 2048),
    "down proj": (2048, 8192),
    "router": (1, 2048),
    "lm head": (32000, 2048),
}
GROUPS = {  # name: (outputs of each weight, inputs)
    "q/k/v proj": ((2048, 512, 512), 2048),
    "gate/up proj": ((8192, 8192), 2048),
}
TUNABLES = ("BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES", "PROGRAMS_PER_SM")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32,64")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--bandwidth-tbs", type=float, default=4.2, help="for the bytes bound")
    p.add_argument("--block-n", default="auto", help="BLOCK_N values to time (comma list; auto: by the outputs)")
    p.add_argument("--block-k", default=str(decode_linear.BLOCK_K))
    p.add_argument("--warps", default=str(decode_linear.NUM_WARPS))
    p.add_argument("--stages", default=str(decode_linear.NUM_STAGES))
    p.add_argument(
        "--programs", help="PROGRAMS_PER_SM values (GROUP_PROGRAMS_PER_SM with --groups; default: its value)"
    )
    p.add_argument("--groups", action="store_true", help="time the groups of one input (GROUPS) instead")
    p.add_argument("--out", help="JSON records")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_linear.py times CUDA kernels; this machine has no CUDA device.", file=sys.stderr)
        return 2
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(f"# {torch.cuda.get_device_name(dev)}, bf16, bytes bound at {args.bandwidth_tbs} TB/s")
    if args.programs is None:
        args.programs = str(decode_linear.GROUP_PROGRAMS_PER_SM if args.groups else decode_linear.PROGRAMS_PER_SM)
    settings = list(
        itertools.product(
            *(
                [None if v == "auto" else int(v) for v in getattr(args, a).split(",")]
                for a in ("block_n", "block_k", "warps", "stages", "programs")
            )
        )
    )
    if args.groups:
        records = time_groups(args, settings)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
        return 0
    records = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            bound = (N * K + M * (N + K)) * 2 / (args.bandwidth_tbs * 1e12) * 1e6
            cublas = graphed_us(lambda: F.linear(x, w))
            ref = decode_linear.reference(x, w).float()
            chosen = decode_linear.wins(M, N, K)
            timed = time_settings(
                TUNABLES,
                settings,
                lambda: decode_linear.linear(x, w),
                lambda out: (out.float() - ref).abs().max().item(),
            )
            record = dict(
                shape=name,
                outputs=N,
                inputs=K,
                rows=M,
                bound_us=bound,
                cublas_us=cublas,
                kernel_runs=chosen,
                kernel=timed,
            )
            best = fastest(timed)
            print(
                f"{name:13s} {N:>6}x{K:<5} rows {M:>3}: bound {bound:7.2f} us, cuBLAS {cublas:7.2f} "
                f"({bound / cublas:4.0%}), kernel best {best[1]['us']:7.2f} ({bound / best[1]['us']:4.0%}) at "
                f"N/K/warps/stages/programs {best[0]}, max diff {best[1]['max_diff']}; decode runs "
                f"{'the kernel' if chosen else 'cuBLAS'}"
            )
            print_settings(timed)
            records.append(record)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


def time_settings(tunables, settings, run, diff) -> dict:
    """`run` timed (and `diff` of its result from the reference) with each setting of the module's
    `tunables`, which are put back after; a setting Triton cannot compile gets NaN and its error."""
    defaults = tuple(getattr(decode_linear, t) for t in tunables)
    timed = {}
    for setting in settings:
        for t, value in zip(tunables, setting):
            setattr(decode_linear, t, value)
        try:
            us, max_diff = graphed_us(run), diff(run())
        except Exception as error:  # noqa: BLE001 - a setting Triton cannot compile: say so, go on
            us, max_diff = float("nan"), f"{type(error).__name__}"
        timed["/".join(map(str, setting))] = dict(us=us, max_diff=max_diff)
    for t, value in zip(tunables, defaults):
        setattr(decode_linear, t, value)
    return timed


def print_settings(timed: dict) -> None:
    """Every setting's time, where several were timed."""
    if len(timed) > 1:
        print("    " + "  ".join(f"{k}: {v['us']:.2f}" for k, v in timed.items()))


def fastest(timed: dict) -> tuple:
    """The (setting, result) of `time_settings` with the fewest microseconds (NaN last)."""
    return min(timed.items(), key=lambda kv: kv[1]["us"] if kv[1]["us"] == kv[1]["us"] else 1e9)


def time_groups(args, settings) -> list:
    """Each group: cuBLAS on each weight, the per-call choice on each, one launch (per setting)."""
    tunables = (*TUNABLES[:-1], "GROUP_PROGRAMS_PER_SM")
    dev, dtype, records = torch.device("cuda"), torch.bfloat16, []
    for name, (ns, K) in GROUPS.items():
        ws = [torch.randn(n, K, device=dev, dtype=dtype) / K**0.5 for n in ns]
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            bound = (sum(ns) * K + M * (sum(ns) + K)) * 2 / (args.bandwidth_tbs * 1e12) * 1e6
            cublas = graphed_us(lambda: [F.linear(x, w) for w in ws])
            each = graphed_us(lambda: [decode_linear.linear(x, w) for w in ws])
            refs = [decode_linear.reference(x, w).float() for w in ws]
            timed = time_settings(
                tunables,
                settings,
                lambda: decode_linear._launch(x, ws, [None] * len(ws)),
                lambda outs: max((o.float() - r).abs().max().item() for o, r in zip(outs, refs)),
            )
            record = dict(
                group=name, outputs=list(ns), inputs=K, rows=M, bound_us=bound, cublas_us=cublas, each_us=each,
                one_launch_runs=decode_linear.group_wins(M, list(ns), K), one_launch=timed,
            )  # fmt: skip
            best = fastest(timed)
            print(
                f"{name:13s} {'+'.join(map(str, ns)):>15}x{K:<5} rows {M:>3}: bound {bound:7.2f} us, cuBLAS each "
                f"{cublas:7.2f}, per-call choice {each:7.2f}, one launch {best[1]['us']:7.2f} ({bound / best[1]['us']:4.0%}) "
                f"at {best[0]}, max diff {best[1]['max_diff']}; compiled steps run "
                f"{'one launch' if record['one_launch_runs'] else 'each'}"
            )
            print_settings(timed)
            records.append(record)
    return records


if __name__ == "__main__":
    raise SystemExit(main())
