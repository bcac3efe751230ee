"""Adapters: how a model family's layers are found and called on a token subset."""

from .base import Adapter, LayerCall, TokenRoles

__all__ = ["Adapter", "LayerCall", "TokenRoles"]
