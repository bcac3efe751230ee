"""Hugging Face transformers families: everything modadapt knows about transformers models.

`decoder` (decoder-only LLMs), `llava` (LLaVA vision-language models, on the decoder machinery),
`kv_cache` (MoD bookkeeping inside transformers' cache layers), `attention` (the attention
functions registered with transformers), `attention_maps` (eager attention maps for analysis)
and `presets` (a tiny offline model of each family).
"""

from .decoder import TESTED_FAMILIES, HFDecoderAdapter
from .llava import LlavaAdapter, role_stats

__all__ = ["HFDecoderAdapter", "LlavaAdapter", "TESTED_FAMILIES", "role_stats"]
