"""The GPU profiling scripts' host-side pieces: `benchmarks/profile_graphed.py`'s one-step
timeline (cut at the step's last kernel, gaps between kernels), `benchmarks/graph_nodes.py`'s
refusal off the GPU and `benchmarks/decode_attention.py`'s shapes."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_attention  # noqa: E402
import graph_nodes  # noqa: E402
import profile_graphed  # noqa: E402


def _kernel(name: str, start: float, end: float):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=span)


def test_the_timeline_is_the_middle_steps_kernels_with_their_gaps(tmp_path):
    """Kernels out of order are sorted; steps end at the token's scatter; the middle step's lines
    give each kernel's offset, duration and idle gap, and the totals add them up."""
    end = "void at::native::_scatter_gather_elementwise_kernel"
    kernels = []
    for step in range(3):
        t = 100.0 * step
        kernels += [_kernel("norm", t, t + 2), _kernel("linear", t + 3, t + 10), _kernel(end, t + 12, t + 13)]
    kernels.reverse()
    steps = profile_graphed.step_kernels(kernels)
    assert [[k.name for k in s] for s in steps] == [["norm", "linear", end]] * 3
    path = tmp_path / "timeline.txt"
    profile_graphed.write_timeline(str(path), kernels, "# header")
    lines = path.read_text().splitlines()
    assert lines[0] == "# header" and lines[1] == "# step 1 of 3: 3 kernels"
    assert lines[3].split()[:3] == ["0.0", "2.0", "0.0"] and lines[4].split()[:3] == ["3.0", "7.0", "1.0"]
    assert lines[-1] == "# busy 10 us, idle between kernels 3 us, span 13 us"


def test_the_timeline_refuses_kernels_without_a_step_end(tmp_path):
    with pytest.raises(SystemExit, match="no decode step ended"):
        profile_graphed.write_timeline(str(tmp_path / "t.txt"), [_kernel("norm", 0, 1)], "#")
    assert not (tmp_path / "t.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal off the GPU")
def test_graph_nodes_refuses_to_run_without_a_gpu(capsys):
    assert graph_nodes.main([]) == 2
    assert "has none" in capsys.readouterr().err


def test_decode_attention_shapes_and_their_bad_input(capsys):
    """`BxC[:R[:P]]`: R rows of B reading about P of capacity C (all rows, all of it by default);
    a malformed item is one argparse error naming it, before anything touches the GPU."""
    args = SimpleNamespace(shapes="8x18432:4:0.9,1x2048,32x384:4", contexts="", batches="")
    assert decode_attention.shapes(args) == [(8, 18432, 4, 0.9), (1, 2048, 1, 1.0), (32, 384, 4, 1.0)]
    grid = SimpleNamespace(shapes=None, contexts="2048,4096", batches="1,8")
    assert decode_attention.shapes(grid) == [(1, 2048, 1, 1.0), (8, 2048, 8, 1.0), (1, 4096, 1, 1.0), (8, 4096, 8, 1.0)]
    for bad in ("8x", "8x100:9", "8x100:0", "8x100:2:1.5", "8x100:2:0.5:1", "ax100"):
        with pytest.raises(SystemExit) as exit_info:
            decode_attention.main(["--shapes", bad])
        assert exit_info.value.code == 2
        assert f"--shapes item {bad!r}" in capsys.readouterr().err
