"""Old path of the timm ViT adapter, now `modadapt.adapters.timm.vit`; its names keep working from
here for one release, with a DeprecationWarning."""

from ..deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: f"modadapt.adapters.timm.vit:{name}"
        for name in ("KWARGS_ATTR", "TimmViTAdapter", "create_model", "input_size")
    },
)
