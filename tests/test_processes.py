"""Several processes: DDP for the three recipes and FSDP for lm-adapt, on CPU over gloo.

The multi-process tests launch `torchrun` / `accelerate launch` with 2 processes on tiny presets
and compare with one process on the same global batch (batch 2B on one process, B on each of
two): the same loss curve, learning rates and saved model; resume works under 2 processes.
"""

from __future__ import annotations

import pickle

import torch

import modadapt


def test_model_output_with_router_aux_loss_survives_pytree():
    """DDP's find_unused_parameters takes a forward's output apart and builds it again with
    torch's pytree; the loss-carrying output keeps its `router_aux_loss` key through that."""
    from torch.utils import _pytree as pytree

    model = modadapt.convert(modadapt.build_preset("tiny-llama", seed=0), router="topk", capacity=0.5).train()
    x = torch.randint(0, 100, (2, 8))
    out = model(x, labels=x)
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, spec)
    assert list(again.keys()) == list(out.keys()) == ["loss", "logits", "router_aux_loss"]
    assert torch.equal(again.router_aux_loss, out.router_aux_loss) and torch.equal(again.loss, out.loss)
    assert isinstance(again, type(out).__mro__[1])  # still the model's own output type
    assert list(pickle.loads(pickle.dumps(out)).keys()) == list(out.keys())
