"""Kernel-level profile of graphed decode steps (`modadapt.GraphedDecoder`) on the GPU.

    python benchmarks/profile_graphed.py --batch 32 [--router threshold-p] [--branches gather] [--steps 8] [--compile]
        [--timeline PATH]

Builds the `speed.py` model (random weights, bf16), converts it when --router is given (calibrated
as in speed.py), prefills a 2048-token prompt and profiles --steps graph-replayed decode steps:
the CUDA kernel table (time per step) and the step's wall time, to see where a step goes.
`--timeline` writes one step's kernels in order (start, duration, the idle gap before each): where
the time between kernels goes, which a table of totals cannot show.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import speed

from modadapt.decoding import BRANCHES, GraphedDecoder, compiled, decode_linear


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--router", default=None, choices=[None, *speed.ROUTERS])
    parser.add_argument("--branches", default="auto", choices=BRANCHES, help="GraphedDecoder's branches")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument(
        "--compile", action="store_true", help="GraphedDecoder(compile=True): the layers through torch.compile"
    )
    parser.add_argument(
        "--linear-kernel", default="triton", choices=("triton", "cublas"), help="decode_linear.LINEAR_KERNEL"
    )
    parser.add_argument(
        "--combo-kernels", default="on", choices=("on", "off"), help="compiled.COMBO_KERNELS (with --compile)"
    )
    parser.add_argument("--timeline", default=None, help="write one decode step's kernels in order to this file")
    args = parser.parse_args()
    decode_linear.LINEAR_KERNEL = args.linear_kernel
    compiled.COMBO_KERNELS = args.combo_kernels == "on"
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = speed.build_dense(speed.FULL["model"], device, dtype)
    shape = speed.Shape.of(model)
    if args.router:
        calib = torch.randint(0, shape.V, (2, 1024), generator=torch.Generator().manual_seed(99)).to(device)
        model, _, _ = speed.make_mod(model, args.router, calib, seed=100)
    ids = torch.randint(0, shape.V, (args.batch, args.context), generator=torch.Generator().manual_seed(11)).to(device)
    decoder = GraphedDecoder(model, branches=args.branches, compile=args.compile)
    decoder.prefill(ids, None, args.steps * 2)
    decoder.decode(args.steps)  # warm
    decoder.prefill(ids, None, args.steps * 2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.decode(args.steps)
        torch.cuda.synchronize()
    print(
        f"# batch {args.batch}, router {args.router}, branches {decoder.last_step.mode}, linear kernel {args.linear_kernel}; "
        f"per-step times are totals / {args.steps}"
    )
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:
        busy = sum(e.time_range.elapsed_us() for e in kernels) / args.steps
        span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / args.steps
        print(f"# per step: {len(kernels) / args.steps:.0f} kernels, {busy:.0f} us busy of a {span:.0f} us span")
        if args.timeline:
            write_timeline(args.timeline, kernels, f"# {' '.join(sys.argv[1:])}")

    return 0


#: The kernel that ends every decode step (the token's write into the output, `out.scatter_`).
STEP_END = "scatter_gather"


def step_kernels(kernels: list) -> list[list]:
    """`kernels` (profiler events) in start order, cut into decode steps after each `STEP_END`."""
    steps, current = [], []
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        current.append(e)
        if STEP_END in e.name:
            steps.append(current)
            current = []
    return steps


def write_timeline(path: str, kernels: list, header: str) -> None:
    """The middle step's kernels: offset from its first kernel's start, duration, idle gap before
    (us), name; then the step's busy time and idle gaps in all."""
    steps = step_kernels(kernels)
    if not steps:
        raise SystemExit(f"no decode step ended with a {STEP_END} kernel: nothing to write to {path}")
    step = steps[len(steps) // 2]
    t0, end = step[0].time_range.start, step[0].time_range.start
    lines = [header, f"# step {len(steps) // 2} of {len(steps)}: {len(step)} kernels", "start_us  dur_us  gap_us  name"]
    busy = idle = 0.0
    for e in step:
        gap = max(0.0, e.time_range.start - end)
        dur = e.time_range.elapsed_us()
        busy, idle, end = busy + dur, idle + gap, max(end, e.time_range.end)
        lines.append(f"{e.time_range.start - t0:8.1f} {dur:7.1f} {gap:7.1f}  {e.name[:100]}")
    lines.append(f"# busy {busy:.0f} us, idle between kernels {idle:.0f} us, span {end - t0:.0f} us")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"# timeline of one step ({len(step)} kernels, {idle:.0f} us idle) written to {path}")


if __name__ == "__main__":
    sys.exit(main())
