"""Registers the built-in adapters through the same hook third-party plugins use."""

from ..plugins import hookimpl
from .hf_decoder import HFDecoderAdapter
from .llava import LlavaAdapter
from .timm_vit import TimmViTAdapter


@hookimpl
def register_adapters(register):
    register(HFDecoderAdapter)
    register(TimmViTAdapter)
    register(LlavaAdapter)
