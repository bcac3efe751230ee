"""PEFT (LoRA & co.) on a converted model, with the routers kept trainable.

`peft.get_peft_model` freezes every parameter that is not an adapter's, routers included. A
config from `peft_config` lists the routers in ``modules_to_save``, so peft trains them (a copy
per router, which the MoD layer then calls), saves them with the adapter, and
`PeftModel.from_pretrained` on the same converted base restores them::

    model = modadapt.convert(model, router="topk", capacity=0.5)
    peft_model = peft.get_peft_model(model, modadapt.peft_config(model, r=8))

`merge_and_unload()` puts the trained routers back in the layers, a model `modadapt.save` saves.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .errors import ModAdaptError
from .mod_layer import routed_module, state_of


def projection_names(model: nn.Module) -> list[str]:
    """Full names of the family's linear maps (nn.Linear, GPT-2's Conv1D) inside the layer stack,
    routers excluded: what LoRA targets by default."""
    from .metrics.layer_stack import find_layers
    from .plugins import find_adapter

    adapter = find_adapter(model)
    stack = find_layers(model)
    layer_ids = {id(layer) for layer in stack}
    prefixes = [name + "." for name, module in model.named_modules() if id(module) in layer_ids]
    return [
        name
        for name, module in model.named_modules()
        if any(name.startswith(p) for p in prefixes) and ".router." not in f".{name}." and adapter.is_linear_map(module)
    ]


def router_module_names(model: nn.Module) -> list[str]:
    """Full names of the routers of a converted model that have parameters (one per MoD layer)."""
    state = state_of(model)
    if state is None:
        raise ModAdaptError("this model is not converted; call modadapt.convert(model, ...) first.")
    layer_ids = {}
    _, layers = state.adapter.layer_stack(model)
    for index in state.layer_indices:  # the module that carries the router: the layer, or its routed sublayer
        layer_ids[id(routed_module(layers[index]))] = index
    names, owners = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in layer_ids:
            router = module.router
            if next(router.parameters(), None) is None:
                continue
            owners.setdefault(id(router), []).append(layer_ids[id(module)])
            names.append(f"{name}.router")
    shared = [layers for layers in owners.values() if len(layers) > 1]
    if shared:
        raise ModAdaptError(
            f"layers {shared[0]} share one router module; peft's modules_to_save would give each its own copy. "
            "Convert with router_kwargs={'per_layer': True}, or train without peft (lm-adapt --train all)."
        )
    return names


def peft_config(model: nn.Module, config: Any = None, **lora_kwargs: Any) -> Any:
    """A peft config for the converted `model` whose ``modules_to_save`` also holds its routers.

    `config` is any peft config with ``modules_to_save`` (a copy is returned, the routers added
    to what it lists); without one, a `peft.LoraConfig` of `lora_kwargs` whose ``target_modules``
    default to the layer stack's projections (``fan_in_fan_out`` set for GPT-2's Conv1D).
    """
    try:
        import peft
    except ImportError:
        raise ModAdaptError("peft_config needs peft; `pip install peft` (or modadapt[lora]).") from None
    routers = router_module_names(model)
    if config is not None and lora_kwargs:
        raise ModAdaptError("peft_config takes a peft config or LoraConfig keyword arguments, not both.")
    if config is None:
        from .plugins import find_adapter

        defaults = {
            "target_modules": projection_names(model),
            "fan_in_fan_out": find_adapter(model).transposed_linear_weights(model),
        }
        try:
            config = peft.LoraConfig(**{**defaults, **lora_kwargs})
        except (TypeError, ValueError) as exc:
            raise ModAdaptError(f"peft_config: {exc}") from None
    elif not hasattr(config, "modules_to_save"):
        raise ModAdaptError(
            f"{type(config).__name__} has no modules_to_save: peft cannot keep the routers trainable with it."
        )
    else:
        config = copy.deepcopy(config)
    listed = list(config.modules_to_save or [])
    config.modules_to_save = listed + [name for name in routers if name not in listed]
    return config
