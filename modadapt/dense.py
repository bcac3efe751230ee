"""`dense(model)`: run a converted model as its dense original, on the same weights, for a while.

A dense baseline or a distillation teacher needs the model without routing. Unloading a copy
doubles the weight memory; inside ``with modadapt.dense(model):`` every MoD layer instead runs its
original forward on all tokens (as PEFT's ``disable_adapter()`` does for adapters), so outputs,
generation and gradients are those of the unconverted model; routing resumes on exit, also when
the block raises. The routers stay attached (their parameters get no gradient inside). A KV cache
belongs to the mode it was filled in: do not continue a routed cache densely, nor the reverse.
`GraphedDecoder` routes by itself and refuses to decode inside the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import ModAdaptError
from .mod_layer import state_of


@contextlib.contextmanager
def dense(model: nn.Module) -> Iterator[nn.Module]:
    """Every MoD layer of `model` runs dense inside the block; yields the model."""
    state = state_of(model)
    if state is None:
        raise ModAdaptError("this model is not converted; modadapt.dense(model) needs a converted model.")
    before = state.dense
    state.dense = True
    try:
        yield model
    finally:
        state.dense = before
