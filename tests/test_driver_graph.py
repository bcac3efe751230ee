"""Conditional graph nodes through the CUDA driver (`modadapt.decoding.driver_graph`).

On CPU: the node-parameter struct has the driver's layout, and without a GPU nothing claims the
driver path. On the GPU machine (`python -m pytest tests/test_driver_graph.py -k cuda`): a stitched
graph runs its IF body exactly when some device byte says so, launch after launch.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from modadapt.decoding import driver_graph
from modadapt.decoding.step import conditional_nodes_available, torch_conditional_nodes


def test_node_params_have_the_drivers_layout():
    """`CUgraphNodeParams` is 256 bytes; `CUDA_CONDITIONAL_NODE_PARAMS` sits in its union at 16:
    handle, type, size, the body graphs' pointer, the context (cuda.h, CUDA 12.4 and later)."""
    P = driver_graph._NodeParams
    assert ctypes.sizeof(P) == 256
    offsets = {name: getattr(P, name).offset for name in ("type", "handle", "cond_type", "size", "graphs_out", "ctx")}
    assert offsets == {"type": 0, "handle": 16, "cond_type": 24, "size": 28, "graphs_out": 32, "ctx": 40}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_driver_path_without_a_gpu():
    assert not driver_graph.available()
    assert conditional_nodes_available() == torch_conditional_nodes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="builds CUDA graphs")
def test_stitched_graph_runs_its_body_when_a_byte_says_so_on_cuda():
    """The condition is any of the rows' bytes (a MoD layer at batch runs if some row keeps)."""
    if not driver_graph.available():
        pytest.skip(f"no driver conditional nodes here: {driver_graph._DRIVER.get('error')}")
    x = torch.zeros(4, device="cuda")
    source = torch.zeros(3, dtype=torch.uint8, device="cuda")
    flag = torch.zeros(3, dtype=torch.bool, device="cuda")
    graph = driver_graph.ConditionalGraph()
    handle = graph.condition()
    decide, body, after = (torch.cuda.CUDAGraph(keep_graph=True) for _ in range(3))
    with torch.cuda.graph(decide):
        flag.copy_(source != 0)
        graph.set_condition(handle, flag)
    with torch.cuda.graph(body, pool=decide.pool()):
        x.add_(1)
    with torch.cuda.graph(after, pool=decide.pool()):
        x.mul_(2)
    graph.add(decide)
    graph.add_if(handle, body)
    graph.add(after)
    graph.instantiate()
    expected = 0.0
    for rows in ((0, 0, 0), (1, 0, 0), (0, 0, 7), (0, 0, 0), (1, 1, 1)):
        source.copy_(torch.tensor(rows, dtype=torch.uint8))
        graph.launch()
        expected = (expected + any(rows)) * 2
        torch.cuda.synchronize()
        assert x.tolist() == [expected] * 4, rows
    with pytest.raises(Exception, match="bytes on the GPU"):
        graph.set_condition(handle, x)
