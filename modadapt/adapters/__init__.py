"""Adapters: how a model family's layers are found and called on a token subset."""

from .base import Adapter, DecodeParts, LayerCall, TokenRoles

__all__ = ["Adapter", "DecodeParts", "LayerCall", "TokenRoles"]
