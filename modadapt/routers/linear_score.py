"""A zero-initialised linear token score, computed in float32 whatever the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearScore(nn.Module):
    """`w . x + b` per token. Zero init: every token scores 0 until training moves it.

    The product runs in the model's dtype (no float32 copy of the hidden states; the matmul
    accumulates in float32 anyway); the small `[B, T]` result is returned in float32.
    """

    def __init__(self, hidden_size: int, outputs: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, hidden_size))
        self.bias = nn.Parameter(torch.zeros(outputs))
        self.outputs = outputs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.weight.to(hidden.dtype), self.bias.to(hidden.dtype)).float()
        return out.squeeze(-1) if self.outputs == 1 else out
