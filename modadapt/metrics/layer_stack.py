"""Find the layer stack of any model the analysis runs on, convertible or not.

Convertible models use their adapter's `layer_stack`. Models no adapter converts (a BERT encoder,
a timm model that is no VisionTransformer) can still be analysed: the first registered adapter
(by name) that recognises one as of its library gives its stack (`Adapter.analysis_layer_stack`)
and, for ARank, its attention maps.
"""

from __future__ import annotations

from torch import nn

from ..adapters.base import Adapter
from ..errors import ModAdaptError


def analysis_adapter(model: nn.Module) -> tuple[Adapter, nn.ModuleList]:
    """The adapter the analysis asks about `model`, and the model's stack of layers, in order."""
    from ..plugins import find_adapter, registry

    try:
        adapter = find_adapter(model)
        return adapter, adapter.layer_stack(model)[1]
    except ModAdaptError:
        pass
    for entry in registry().list("adapter"):
        adapter = entry.obj()
        stack = adapter.analysis_layer_stack(model)
        if stack is not None:
            return adapter, stack
    raise ModAdaptError(
        f"could not find the layer stack of {type(model).__name__}: no installed adapter recognises it "
        "(built in: transformers models with `_no_split_modules` layers, timm models with `blocks`)."
    )


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers, in order."""
    return analysis_adapter(model)[1]
