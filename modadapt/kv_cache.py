"""Old path of the MoD KV-cache bookkeeping, now `modadapt.adapters.hf.kv_cache` (it lives in
transformers' cache layers); its names keep working from here for one release, with a
DeprecationWarning."""

from .deprecation import moved_names

__getattr__ = moved_names(__name__, {"mod_cache_layer": "modadapt.adapters.hf.kv_cache:mod_cache_layer"})
