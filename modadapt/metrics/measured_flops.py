"""FLOPs of one real forward: `torch.utils.flop_counter` for everything it counts reliably, plus an
explicit formula for attention.

The flop counter sees every matrix multiplication a forward actually runs, so a MoD layer is
counted on the tokens it kept. It counts fused attention (SDPA) as zero on CPU and not at all in
some kernels, so SDPA ops are dropped from its tally and attention is added by formula,
`4 * B * H * Tq * Tk * d` per call (scores and weighted values; the full square, as a dense kernel
computes it), from hooks on each block's attention. What routers compute besides their own modules
(the `attention` router recomputes the preceding layer's map) is added from `Router.extra_flops`
(the part the counter also sees, e.g. its `q . k` matmul, is moved out of ``matmul`` so that it
counts once).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..mod_layer import state_of
from ..routers.base import Router


def _is_timm_attention(module: nn.Module) -> bool:
    return hasattr(module, "qkv") and hasattr(module, "num_heads") and hasattr(module, "head_dim")


def measured_flops(model: nn.Module, inputs: torch.Tensor) -> dict:
    """FLOPs of `model(inputs)` (timm ViTs, converted or not; inside `modadapt.dense` its routers
    count nothing) under `torch.no_grad()`.

    Returns:
        ``total``, ``matmul`` (flop counter, SDPA excluded), ``attention`` (formula) and
        ``router`` (`Router.extra_flops` of every router), all for the whole batch.
    """
    attention = 0

    def count(module, args):
        nonlocal attention
        B, N = args[0].shape[:2]
        attention += 4 * B * module.num_heads * N * N * module.head_dim

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if _is_timm_attention(m)]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    matmul = sum(
        n for op, n in counter.get_flop_counts().get("Global", {}).items() if "scaled_dot_product" not in str(op)
    )
    state = state_of(model)
    routers = [m for m in model.modules() if isinstance(m, Router)] if state is None or not state.dense else []
    router = sum(r.extra_flops() for r in routers)
    matmul -= sum(r.extra_flops(matmul_only=True) for r in routers)  # the counter saw q.k: count it once
    return {"total": matmul + attention + router, "matmul": matmul, "attention": attention, "router": router}
