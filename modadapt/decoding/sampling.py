"""How a decode step picks its token: the argmax, or a draw after temperature, top-k and top-p.

Its own module because the filters must run inside a captured CUDA graph: static shapes, no host
sync, the default generator (so `torch.manual_seed` repeats a draw), with the order and cut-offs
transformers uses, so that sampled generation means what `model.generate` means by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModAdaptError


@dataclass(frozen=True)
class Sampling:
    """How a step picks its token when sampling: temperature, then top-k (0 or None: off), then
    top-p (nucleus; None or 1: off), in the order and with the cut-offs transformers uses. Part of
    a captured step (steps are keyed on it)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ModAdaptError(f"temperature must be a number > 0, got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ModAdaptError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ModAdaptError(f"top_p must be in (0, 1], got {self.top_p!r}")


def next_token(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    """`[B, 1]` tokens from `[B, V]` logits: the argmax, or a draw (static shapes, no host sync,
    so it can be captured; the draw uses the default generator, so `torch.manual_seed` repeats it)."""
    if sampling is None:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(sampling_logits(logits, sampling).softmax(-1), 1)


def sampling_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Float logits scaled by the temperature, with the tokens top-k and top-p drop at -inf."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before the token already suffices
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    return logits
