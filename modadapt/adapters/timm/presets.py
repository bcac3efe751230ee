"""The tiny timm ViT with random weights, so that the ViT adapter can be tried offline and tested."""

from __future__ import annotations

from torch import nn

from ...hookspecs import Preset
from .vit import create_model


def _tiny_vit() -> nn.Module:
    # 32x32 RGB, 4x4 patches: 64 patch tokens + a class token; 10 classes (e.g. upsampled digits).
    return create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10
    )


PRESETS: tuple[Preset, ...] = (Preset("tiny-vit", _tiny_vit, "timm ViT, 32x32 images, 4x4 patches, 10 classes"),)
