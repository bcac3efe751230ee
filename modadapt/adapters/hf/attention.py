"""Every attention function modadapt registers with transformers, and the switch to one of them.

transformers layers call their attention through a function looked up by name in the config
(`config._attn_implementation`). modadapt adds three, each used only for as long as it is needed:

- `VARLEN_ATTENTION`: a packed MoD layer call, every row's kept tokens as one sequence attended
  per row (`modadapt.varlen`);
- `PROBE_ATTENTION` / `PROBE_EAGER_ATTENTION`: records the q/k a watched layer receives, then runs
  SDPA / the family's own eager attention (attention probes; soft-capping, Gemma 2, needs eager);
- `STATIC_ATTENTION`: one token per row against `GraphedDecoder`'s static cache
  (`modadapt.decoding.static_cache`).

Kept in one module so that the transformers calling convention (argument names, the
`(output, weights)` return) is met in one place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

from ...attention_probe import PROBE_ATTENTION, PROBE_EAGER_ATTENTION
from ...decoding.static_cache import STATIC_ATTENTION, KeyLengths, static_cache_attention
from ...errors import ModAdaptError
from ...varlen import APPEND_KWARG, MAX_LEN_KWARG, SEGMENTS_KWARG, varlen_attention

#: Name of the transformers attention function that runs packed segments.
VARLEN_ATTENTION = "modadapt_varlen"

__all__ = [
    "PROBE_ATTENTION",
    "PROBE_EAGER_ATTENTION",
    "STATIC_ATTENTION",
    "VARLEN_ATTENTION",
    "register_attention_functions",
    "use_attention",
]


def transformers_varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The attention function of a packed call: `query` `[1, H, N, d]`, keys and values
    `[1, Hk, N, d]`; returns `([1, N, H, d], None)` like the SDPA function."""
    segments = kwargs.get(SEGMENTS_KWARG)
    if segments is None or query.shape[0] != 1:
        raise ModAdaptError(f"{VARLEN_ATTENTION} attention only runs MoD layers' packed calls.")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ModAdaptError(f"packed MoD attention does not support {name!r}; convert with packing='padded'.")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    k_segments, has_past = segments, False
    append = kwargs.get(APPEND_KWARG)
    if append is not None:
        key, value, k_segments, has_past = append(key, value, segments)
    max_q, max_k = kwargs[MAX_LEN_KWARG]
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        segments,
        k_segments,
        max_q,
        max_k,
        scale=scaling,
        causal=bool(causal) and not has_past,  # with a past: one new token per row, which sees it all
        dropout=dropout,
    )
    return out[None], None


def _record_probes(module, query, key, attention_mask, scaling, is_causal, softcap) -> None:
    """Hand q/k to the probes watching `module`."""
    for probe, index in getattr(module, "_modadapt_probes", ()):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probe.record(index, query, key, scale=scale, causal=bool(causal), mask=attention_mask, softcap=softcap)


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA attention that first hands q/k to the probes watching `module`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _record_probes(module, query, key, attention_mask, scaling, is_causal, kwargs.get("softcap"))
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def probe_eager_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The family's eager attention (what `attn_implementation="eager"` runs: the
    `eager_attention_forward` of the module's modeling file) that first hands q/k to the probes."""
    eager = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if eager is None:
        raise ModAdaptError(f"{type(module).__name__}'s modeling module has no eager_attention_forward to probe.")
    _record_probes(module, query, key, attention_mask, scaling, is_causal, kwargs.get("softcap"))
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def static_decode_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The attention function of a graphed decode step: one query token per row (`[B, H, 1, d]`;
    a speculative verification: `attention_mask.queries`) against the static cache
    `[B, capacity, Hk, d]`; the mask argument carries the used lengths and the layer's sliding
    window (from the config, `DecodeParts.windows`), which must be the `sliding_window` the layer
    passes, if it passes one; `softcap` (Gemma 2) soft-caps the scores. Returns `([B, T, H, d],
    None)` like the SDPA function."""
    if not isinstance(attention_mask, KeyLengths) or query.shape[2] != attention_mask.queries:
        raise ModAdaptError(f"{STATIC_ATTENTION} attention only runs GraphedDecoder's decode steps.")
    window = kwargs.get("sliding_window") or None  # Qwen2-MoE says 0 for none
    if "sliding_window" in kwargs and window != attention_mask.window:
        raise ModAdaptError(
            f"layer {getattr(module, 'layer_idx', '?')} attends with sliding_window={window}, but its config "
            f"gives it {attention_mask.window}; set config.sliding_window (and layer_types) to what the layers use."
        )
    return static_cache_attention(query, key, value, attention_mask, scaling, softcap=kwargs.get("softcap")), None


@functools.cache
def register_attention_functions() -> None:
    """Register modadapt's attention functions with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, transformers_varlen_attention)
    AttentionInterface.register(PROBE_ATTENTION, probe_attention)
    AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)  # the probe runs SDPA: SDPA-style masks
    AttentionInterface.register(PROBE_EAGER_ATTENTION, probe_eager_attention)
    AttentionMaskInterface.register(PROBE_EAGER_ATTENTION, eager_mask)  # eager attention: additive masks
    AttentionInterface.register(STATIC_ATTENTION, static_decode_attention)


@contextlib.contextmanager
def use_attention(config: Any, name: str) -> Iterator[None]:
    """Point the layers' attention at the registered function `name` for a while (one packed MoD
    layer call; a graphed decode step). The layers read the implementation name from the config
    at call time; setting the stored name directly skips the setter's validation and sub-config
    walk (this runs once per MoD layer call)."""
    before = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = before
