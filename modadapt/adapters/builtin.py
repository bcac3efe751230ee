"""Registers the built-in adapters through the same hook third-party plugins use."""

from ..plugins import hookimpl
from .hf import HFDecoderAdapter, LlavaAdapter
from .timm import TimmViTAdapter


@hookimpl
def register_adapters(register):
    register(HFDecoderAdapter)
    register(TimmViTAdapter)
    register(LlavaAdapter)
