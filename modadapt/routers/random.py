"""`random`: the control. Keeps random tokens at the given capacity.

While training, each forward draws fresh random scores and keeps the top `ceil(capacity * T)`
(`resample=false` uses the fixed scores below instead). The causal rule keeps token i iff a hash
of (seed, layer, position of i) falls under the capacity: deterministic, so prefill + decode
equal a full forward and a padded row routes as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Router, RoutingContext
from .options import RouterOptions, option

_MASK32 = 0xFFFFFFFF


def position_hash(positions: torch.Tensor, layer_index: int, seed: int) -> torch.Tensor:
    """Uniform-looking values in [0, 1) from integer positions (a 32-bit integer mixer)."""
    x = (positions.long() * 0x9E3779B1 + layer_index * 0x85EBCA77 + seed * 0xC2B2AE3D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x.double().div(2.0**32).float()


@dataclass(frozen=True)
class RandomOptions(RouterOptions):
    seed: int = option(0, "seed of the causal rule's position hash (and of resample=false's fixed scores)")
    resample: bool = option(True, "draw fresh random scores every training forward (false: the fixed hash)")


class RandomRouter(Router):
    """Control: random tokens at the given capacity."""

    name = "random"
    causal = False
    capacity_based = True
    Options = RandomOptions

    def score(self, hidden: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        if ctx.training and not ctx.causal and self.options.resample:
            return torch.rand(hidden.shape[:2], device=hidden.device)
        return 1.0 - position_hash(ctx.positions, self.layer_index, self.options.seed)

    def causal_keep(self, logits, hidden, ctx):
        return logits > 1.0 - self.capacity

    def gate(self, logits):
        return None
