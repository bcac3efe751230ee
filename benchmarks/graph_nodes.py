"""What a stitched decode step's graph nodes cost on the GPU, apart from the kernels in them.

    python benchmarks/graph_nodes.py [--pieces 8] [--kernels 12] [--out results/graph-nodes.json]   # GPU only

`branches="conditional"` on torch 2.11 stitches captured pieces into one driver graph
(`modadapt.decoding.driver_graph.ConditionalGraph`): each piece a child-graph node, each MoD
layer's work an IF node around a child graph, its condition set by a one-thread kernel. Here the
same tiny kernels (`--kernels` per piece, one in-place add each) replay as one torch graph, as
`--pieces` child nodes in a row, and with an IF node (and its condition kernel) after each piece,
its body one more piece, taken or not: the differences per node are what a MoD layer's branch
costs beyond its own kernels (a decode step's timeline shows it as idle time around the branch).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from modadapt.decoding import driver_graph


def timed_us(launch, replays: int = 200) -> float:
    """Microseconds per `launch()` (after two untimed ones), by CUDA events."""
    launch(), launch()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        launch()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pieces", type=int, default=8)
    p.add_argument("--kernels", type=int, default=12, help="kernels per piece")
    p.add_argument("--out", help="JSON record")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not driver_graph.available():
        print("graph_nodes.py times CUDA driver graphs; this machine has none.", file=sys.stderr)
        return 2
    x = torch.zeros(256, device="cuda")
    flag = torch.zeros(1, dtype=torch.uint8, device="cuda")

    def piece():
        for _ in range(args.kernels):
            x.add_(1)

    def capture(fns, keep=True):
        graph = torch.cuda.CUDAGraph(keep_graph=keep)
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return graph

    piece()
    torch.cuda.synchronize()
    whole = capture([piece] * args.pieces, keep=False)
    kept = []  # the torch graphs the stitched ones copy: alive as long as those

    def stitched(branches: bool):
        g = driver_graph.ConditionalGraph()
        for _ in range(args.pieces):
            if not branches:
                kept.append(capture([piece]))
                g.add(kept[-1])
                continue
            handle = g.condition()
            kept.append(capture([piece, lambda h=handle: g.set_condition(h, flag)]))
            g.add(kept[-1])
            kept.append(capture([piece]))
            g.add_if(handle, kept[-1])
        g.instantiate()
        return g

    chain, branched = stitched(False), stitched(True)
    n = args.pieces
    one = timed_us(whole.replay)
    times = {"one_graph_us": one, "child_nodes_us": timed_us(chain.launch)}
    flag.fill_(0)
    times["if_skipped_us"] = timed_us(branched.launch)
    flag.fill_(1)
    times["if_taken_us"] = timed_us(branched.launch)
    kernel = one / (n * args.kernels)
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pieces": n,
        "kernels_per_piece": args.kernels,
        **times,
        "kernel_us": kernel,
        # per node, beyond its kernels: a child node's boundary; an IF node with its condition kernel
        "child_node_us": (times["child_nodes_us"] - one) / n,
        "if_skipped_node_us": (times["if_skipped_us"] - times["child_nodes_us"]) / n,
        "if_taken_node_us": (times["if_taken_us"] - times["child_nodes_us"]) / n - args.kernels * kernel,
    }
    for key, value in record.items():
        print(f"{key:22} {value:.2f}" if isinstance(value, float) else f"{key:22} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
