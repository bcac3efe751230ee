"""What differs between the transformers versions modadapt supports, found by feature, not version.

transformers 5.24 renamed the KV-cache argument of every model, decoder layer and attention
module from `past_key_values` to `cache` (the old name is still accepted, with a FutureWarning,
until 5.40), and model outputs return it as `cache` (`past_key_values` reads it, with a warning).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

#: Names a transformers forward takes its KV cache by, newest first: `cache` (5.24 and later),
#: `past_key_values` (5.17-5.23), `past_key_value` (older remote-code layers).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def cache_argument(forward: Callable, default: str = "past_key_values") -> str:
    """The name `forward` (a model's or a layer's) takes its KV cache by (`default` if none)."""
    params = inspect.signature(forward).parameters  # follows transformers' `deprecate_kwarg` wrapper
    return next((name for name in CACHE_ARGUMENTS if name in params), default)


def cache_kwarg(model: Any, cache: Any) -> dict:
    """`{name: cache}` for calling `model` with a KV cache under the name its forward takes
    (`cache` from transformers 5.24, where `past_key_values` warns and goes away in 5.40)."""
    return {cache_argument(getattr(model, "_orig_mod", model).forward): cache}  # a torch.compile wrapper: its model's


def returned_cache(output: Any) -> Any:
    """The KV cache a transformers model output carries (`cache` from 5.24, `past_key_values` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)
