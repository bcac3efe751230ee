"""Find the layer stack of any model the analysis runs on, convertible or not.

Convertible models use their adapter's `layer_stack`. Models no adapter converts (a BERT encoder,
a timm ViT before its adapter exists) can still be analysed: their stack is the `nn.ModuleList`
whose layers are of a class named in `_no_split_modules` (transformers), or timm's `blocks`.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModAdaptError


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers, in order."""
    from ..plugins import find_adapter

    try:
        return find_adapter(model).layer_stack(model)[1]
    except ModAdaptError:
        pass
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return module
    blocks = getattr(model, "blocks", None)  # timm models
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
        return blocks
    raise ModAdaptError(
        f"could not find the layer stack of {type(model).__name__}: it is neither a transformers model "
        "with `_no_split_modules` layers nor a timm model with `blocks`."
    )
