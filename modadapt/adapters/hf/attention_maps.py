"""Attention maps of transformers models materialised by eager attention, for analysis (ARank)
of models an attention probe cannot observe, converted or not (a BERT encoder included)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...errors import ModAdaptError
from ..base import AttentionMapCallback


def _attention_targets(model: nn.Module) -> list:
    """The `(class or name suffix, output index, module-name suffix)` triples of the modules whose
    output holds attention probabilities, from the model's own `_can_record_outputs`."""
    from transformers.utils.output_capturing import OutputRecorder

    specs = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if specs is None:
        raise ModAdaptError(
            f"{type(model).__name__} does not declare where its attention maps are "
            "(no 'attentions' in _can_record_outputs); ARank cannot read them."
        )
    targets = []
    for spec in specs if isinstance(specs, list) else [specs]:
        if isinstance(spec, OutputRecorder):
            targets.append((spec.target_class or spec.class_name, spec.index, spec.layer_name))
        else:
            targets.append((spec, 1, None))
    return targets


def _matches(name: str, module: nn.Module, target, layer_name: str | None) -> bool:
    kind = target if isinstance(target, str) else None
    ok = type(module).__name__.endswith(kind) if kind else isinstance(module, target)
    return ok and (layer_name is None or ("." + name).endswith(layer_name))


@contextlib.contextmanager
def eager_attention_maps(model: nn.Module, layers: nn.ModuleList, callback: AttentionMapCallback) -> Iterator[None]:
    """Each layer's attention probabilities to `callback`, from eager attention (switched to
    inside the context only), read where the model's `_can_record_outputs` says they are."""
    targets = _attention_targets(model)
    handles = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            found = next(((t, i, n) for t, i, n in targets if _matches(name, module, t, n)), None)
            if found is not None:
                handles.append(module.register_forward_hook(_probabilities_hook(index, found[1], callback)))
                break
    previous = model.config._attn_implementation
    try:
        if previous != "eager":
            model.set_attn_implementation("eager")
        yield
    finally:
        for handle in handles:
            handle.remove()
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def _probabilities_hook(index: int, output_index: int, callback: AttentionMapCallback):
    def hook(module: nn.Module, args, output) -> None:
        probs = output[output_index] if isinstance(output, (tuple, list)) else None
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
            raise ModAdaptError(
                f"layer {index}'s attention returned no probability maps; its kernel does not support them."
            )
        callback(index, probs, bool(getattr(module, "is_causal", False)))

    return hook
