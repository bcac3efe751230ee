"""modadapt: convert existing transformers into Mixture-of-Depths models.

Public API::

    import modadapt
    model = modadapt.convert(model, router="topk", capacity=0.125, layers="every-other")
    modadapt.save(model, "out/")
    model = modadapt.load("out/")
    with modadapt.dense(model): ...   # the dense original on the same weights
    modadapt.unload(model)
    tokenizer = modadapt.byte_tokenizer(model)   # the byte-level presets' tokenizer (ids = bytes)
"""

from .config import ModConfig
from .convert import aux_loss, convert, mod_layers, unload
from .cutoffs import calibrate_cutoffs
from .decoding import GraphedDecoder
from .dense import dense
from .errors import ModAdaptError
from .hookspecs import Preset, Recipe
from .lora import peft_config
from .metrics.routing_stats import expert_stats, routing_stats
from .persistence import load, save
from .plugins import hookimpl
from .presets import build_preset
from .routers.base import Router, RoutingContext, RoutingDecision
from .tokenizer import byte_tokenizer
from .version import __version__

__all__ = [
    "__version__",
    "ModConfig",
    "ModAdaptError",
    "GraphedDecoder",
    "Preset",
    "Recipe",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "aux_loss",
    "build_preset",
    "byte_tokenizer",
    "calibrate_cutoffs",
    "convert",
    "dense",
    "expert_stats",
    "hookimpl",
    "load",
    "mod_layers",
    "peft_config",
    "routing_stats",
    "save",
    "unload",
]
