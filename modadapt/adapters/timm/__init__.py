"""timm families: the Vision Transformer adapter (`vit`) and its tiny offline model (`presets`)."""

from .vit import TimmViTAdapter, create_model, input_size

__all__ = ["TimmViTAdapter", "create_model", "input_size"]
