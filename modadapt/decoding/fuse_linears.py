"""A compiled decode step's few-row linear layers, fused: one launch per input, sums left to inductor.

In a compiled step (`GraphedDecoder(compile=True)`) `FewRowsLinear` has made each linear layer of
a decode step's few rows a `modadapt::decode_linear` call. This inductor pass (post-grad, run
while `StepCompiler.compiling`) rewrites them, because at such shapes a step is mostly launches
(issue 17's profile: 1.1B Llama at batch 1, ~16 kernels per layer, 0.5 us idle between them and a
1-2 us ramp each):

- **One launch per input.** A layer multiplies one input by several weights (the attention's q,
  k and v projections take the normed hidden state, the MLP's gate and up projections the next):
  the calls that share an input become one `modadapt::decode_linears` call, which runs them in
  one launch of the kernel where that wins (`decode_linear.group_wins`), each weight's outputs
  its own tensor as before.
- **Narrow layers as reductions.** A call left alone of at most `decode_linear.REDUCED` outputs
  (a MoD router's score) becomes its float32 product and sum as graph ops: inductor computes it
  in the kernel of what consumes it (the router's causal rule), where a launch of its own cost
  ~2 us of a MoD layer's routing.
- **Split sums fused.** Where the kernel splits the reduction over programs (narrow or short
  layers: q/k/v, o and down projections), its second kernel that adds the
  float32 partial sums is replaced: the call returns the partials
  (`modadapt::decode_linear_partials`) and the sum, the bias and the rounding are graph ops that
  inductor fuses into what consumes them (the rotary embedding, the residual add and the next
  norm), so no launch of their own remains. One rounding, from the float32 sum, as before.

Uncompiled steps run the calls one by one, as the model makes them.
"""

from __future__ import annotations

import operator

import torch

from . import decode_linear

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover - a torch without inductor's custom passes: nothing is fused
    CustomGraphPass = None

_VIEWS = ("view", "reshape", "_unsafe_view")


def fuse(graph: torch.fx.Graph) -> dict:
    """`merge`, `reduce_narrow` (a narrow call of an input that others share joins their launch
    first), then `split_sums`; returns how many calls each made."""
    return {"merged": merge(graph), "reduced": reduce_narrow(graph), "split_sums": split_sums(graph)}


def reduce_narrow(graph: torch.fx.Graph) -> int:
    """Replace each `decode_linear` call of at most `decode_linear.REDUCED` outputs by graph ops:
    the float32 products of its input and weight, their sum, the bias, the rounding to the input's
    dtype (one rounding from a float32 sum, as the kernel's); returns how many were replaced."""
    single, convert = torch.ops.modadapt.decode_linear.default, torch.ops.prims.convert_element_type.default
    made = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not single or node.kwargs:
            continue
        x, weight, bias = node.args[0], node.args[1], _bias(node)
        x_val, w_val = _val(x), _val(weight)
        if not isinstance(x_val, torch.Tensor) or not isinstance(w_val, torch.Tensor) or x_val.dim() == 0:
            continue
        if w_val.shape[0] > decode_linear.REDUCED:
            continue
        with graph.inserting_before(node):
            rows = _op(graph, torch.ops.aten.unsqueeze.default, _op(graph, convert, x, torch.float32), -2)
            products = _op(graph, torch.ops.aten.mul.Tensor, rows, _op(graph, convert, weight, torch.float32))
            total = _op(graph, torch.ops.aten.sum.dim_IntList, products, [-1])  # [..., outputs]
            if bias is not None:
                total = _op(graph, torch.ops.aten.add.Tensor, total, bias)
            out = _op(graph, convert, total, x_val.dtype)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        made += 1
    return made


def merge(graph: torch.fx.Graph) -> int:
    """Replace the `decode_linear` calls of each input by `decode_linears` calls of at most
    `decode_linear.GROUP` weights (where each call's weight and bias exist before the first of
    them, so the merged call can take its place); returns how many merged calls were made."""
    single = torch.ops.modadapt.decode_linear.default
    order = {node: i for i, node in enumerate(graph.nodes)}
    by_input: dict = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is single and not node.kwargs:
            by_input.setdefault(_source(node.args[0]), []).append(node)
    made = 0
    for calls in by_input.values():
        first = order[calls[0]]
        ready = [c for c in calls if all(not isinstance(a, torch.fx.Node) or order[a] < first for a in c.args[1:])]
        for start in range(0, len(ready) - 1, decode_linear.GROUP):
            group = ready[start : start + decode_linear.GROUP]
            if len(group) < 2:
                break
            with graph.inserting_before(group[0]):
                merged = graph.call_function(
                    torch.ops.modadapt.decode_linears.default,
                    (group[0].args[0], [c.args[1] for c in group], [_bias(c) for c in group]),
                )
                merged.meta["val"] = [c.meta.get("val") for c in group]
                for i, call in enumerate(group):
                    out = graph.call_function(operator.getitem, (merged, i))
                    out.meta = dict(call.meta)
                    call.replace_all_uses_with(out)
            for call in group:
                graph.erase_node(call)
            made += 1
    return made


def split_sums(graph: torch.fx.Graph) -> int:
    """Replace each kernel call (`decode_linear`, `decode_linears`) that runs the kernel
    (`decode_linear.wins`, `group_wins`) with its reduction split by a `decode_linear_partials`
    call and, per weight, the sum over the splits, the bias and the rounding to the input's dtype
    as graph ops; returns how many calls were replaced."""
    single, group = torch.ops.modadapt.decode_linear.default, torch.ops.modadapt.decode_linears.default
    made = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (single, group) or node.kwargs:
            continue
        x, weights, biases = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        if node.target is single:
            weights, biases = [weights], [biases]
        x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        w_vals = [w.meta.get("val") if isinstance(w, torch.fx.Node) else None for w in weights]
        if x_val is None or any(v is None for v in w_vals) or x_val.dim() == 0:
            continue
        rows, k = x_val.numel() // max(1, x_val.shape[-1]), x_val.shape[-1]
        ns = [w.shape[0] for w in w_vals]
        kernel = decode_linear.wins(rows, ns[0], k) if len(ns) == 1 else decode_linear.group_wins(rows, ns, k)
        if not kernel or decode_linear.splits(rows, ns, k, x_val.device)[1] == 1:
            continue
        outs = [node] if node.target is single else [u for u in node.users if u.target is operator.getitem]
        if node.target is group and len(outs) != len(node.users):
            continue  # a use other than taking an output: leave it
        with graph.inserting_before(node):
            parts = _op(graph, torch.ops.modadapt.decode_linear_partials.default, x, list(weights))
            by_index = {}
            for i, bias in enumerate(biases):
                total = _op(graph, torch.ops.aten.sum.dim_IntList, _op(graph, operator.getitem, parts, i), [0])
                if bias is not None:
                    total = _op(graph, torch.ops.aten.add.Tensor, total, bias)
                rounded = _op(graph, torch.ops.prims.convert_element_type.default, total, x_val.dtype)
                by_index[i] = _op(graph, torch.ops.aten.view.default, rounded, [*x_val.shape[:-1], ns[i]])
        for out in outs:
            out.replace_all_uses_with(by_index[0 if node.target is single else out.args[1]])
            if out is not node:
                graph.erase_node(out)
        graph.erase_node(node)
        made += 1
    return made


def _op(graph: torch.fx.Graph, target, *args) -> torch.fx.Node:
    """A call of `target` on `args` (nodes or constants), its `val` computed on the inputs' fake tensors."""
    node = graph.call_function(target, args)
    vals = [_val(a) for a in args]
    fake = next(v.fake_mode for v in torch.utils._pytree.tree_leaves(vals) if hasattr(v, "fake_mode"))
    with fake:
        node.meta["val"] = target(*vals)
    return node


def _val(arg):
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    if isinstance(arg, list):
        return [_val(a) for a in arg]
    return arg


def _bias(call: torch.fx.Node):
    return call.args[2] if len(call.args) > 2 else None


def _source(node):
    """What a call's input is: equal views of one tensor (two `view(h, shape)` nodes of the same
    `h` and shape) count as that one input."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function":
        target = getattr(node.target, "overloadpacket", None)
        if target is not None and target.__name__ in _VIEWS and node.target.namespace == "aten":
            return ("view", _source(node.args[0]), tuple(node.args[1]))
    return node


if CustomGraphPass is not None:

    class FuseLinears(CustomGraphPass):
        """`fuse` as inductor's post-grad custom pass, after `before` (a pass that was set
        already: both run). Its uuid covers this file, the kernel's and `before`'s, so inductor's
        graph cache tells versions apart."""

        def __init__(self, before=None):
            self.before = before

        def __call__(self, graph: torch.fx.Graph) -> None:
            if self.before is not None:
                self.before(graph)
            fuse(graph)

        def uuid(self):
            own = get_hash_for_files((__file__, decode_linear.__file__))
            before = getattr(self.before, "uuid", None)
            return own if self.before is None else (own, before() if callable(before) else None)

else:  # pragma: no cover
    FuseLinears = None
