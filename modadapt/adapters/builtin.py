"""Registers the built-in adapters through the same hook third-party plugins use."""

from ..plugins import hookimpl
from .hf_decoder import HFDecoderAdapter


@hookimpl
def register_adapters(register):
    register(HFDecoderAdapter)
