"""Static baselines for the quality benchmarks: delete whole layers (`modadapt.prune`, what
`modadapt prune` does) or only their attention sublayers, then heal the model.

Which layers go: evenly spaced ones, or the ones a layer metric of `modadapt analyze` ranks most
redundant (ShortGPT's choice is the `cosine` metric: the layers whose output is most similar to
their input; `arank`: the lowest attention-map rank). Layer 0 is never deleted, as it is never
converted. Deleting attention sublayers is the strongest static baseline reported for large
models (half of a 70B model's attention sublayers cost 2.4%).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from modadapt import config
from modadapt.metrics.selection import select_layers
from modadapt.prune import prune


def evenly_spaced(count: int, layers: int) -> list[int]:
    """`count` of the layers `1 .. layers - 1` as the `evenly:N` layer rule places them (6 of 12:
    1, 3, 5, 7, 9, 11; 4 of 12: 2, 5, 7, 10)."""
    return config.evenly_spaced(count, list(range(1, layers)))


def most_redundant(scores: list[float], count: int, *, lower_is_redundant: bool) -> list[int]:
    """The `count` layers (never 0) that `scores` rank most redundant, as `modadapt analyze` selects."""
    return select_layers(scores, ("count", count), lower_is_redundant=lower_is_redundant)


def remove_layers(dense: nn.Module, drop: list[int]) -> nn.Module:
    """A copy of the causal LM `dense` without the layers in `drop` (`modadapt.prune`)."""
    model = copy.deepcopy(dense)
    prune(model, drop)
    return model


class SkippedAttention(nn.Module):
    """An attention sublayer that adds nothing to the residual stream (and writes no K/V)."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def remove_attention(dense: nn.Module, drop: list[int]) -> nn.Module:
    """A copy of the Llama-style causal LM `dense` whose layers in `drop` lose their attention
    sublayer (their MLP stays)."""
    model = copy.deepcopy(dense)
    for i in drop:
        model.model.layers[i].self_attn = SkippedAttention()
    return model
