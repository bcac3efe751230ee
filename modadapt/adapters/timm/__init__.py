"""timm families: the Vision Transformer adapter (`vit`)."""

from .vit import TimmViTAdapter, create_model, input_size

__all__ = ["TimmViTAdapter", "create_model", "input_size"]
