"""modadapt: convert existing transformers into Mixture-of-Depths models.

Public API::

    import modadapt
    model = modadapt.convert(model, router="topk", capacity=0.125, layers="every-other")
    modadapt.save(model, "out/")
    model = modadapt.load("out/")
    modadapt.unload(model)
"""

__version__ = "0.1.0"

from .config import ModConfig  # noqa: E402
from .convert import aux_loss, convert, mod_layers, unload  # noqa: E402
from .errors import ModAdaptError  # noqa: E402
from .graphed_decode import GraphedDecoder  # noqa: E402
from .metrics.routing_stats import routing_stats  # noqa: E402
from .persistence import load, save  # noqa: E402
from .plugins import hookimpl  # noqa: E402
from .presets import build_preset  # noqa: E402
from .routers.base import Router, RoutingContext, RoutingDecision  # noqa: E402

__all__ = [
    "ModConfig",
    "ModAdaptError",
    "GraphedDecoder",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "aux_loss",
    "build_preset",
    "convert",
    "hookimpl",
    "load",
    "mod_layers",
    "routing_stats",
    "save",
    "unload",
]
