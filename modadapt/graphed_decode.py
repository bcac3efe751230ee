"""Old home of graphed decoding, now the package `modadapt.decoding`; its names keep working
from here for one release, with a DeprecationWarning."""

from .deprecation import moved_names

_NEW_HOMES = {
    "modadapt.decoding": (
        "BRANCHES",
        "BUCKET",
        "CHECK_EVERY",
        "GraphedDecoder",
        "Sampling",
        "conditional_nodes_available",
    ),
    "modadapt.decoding.sampling": ("next_token", "sampling_logits"),
    "modadapt.decoding.static_cache": ("STATIC_ATTENTION", "_FLASH", "flash_key"),
}
_RENAMED = {
    "_KeyLengths": "modadapt.decoding.static_cache:KeyLengths",
    "_StaticCache": "modadapt.decoding.static_cache:StaticCache",
    "_static_decode_attention": "modadapt.adapters.hf.attention:static_decode_attention",
}

__getattr__ = moved_names(
    __name__, {**{name: f"{module}:{name}" for module, names in _NEW_HOMES.items() for name in names}, **_RENAMED}
)
