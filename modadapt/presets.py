"""Built-in tiny models with random weights: try the tool offline, and test every family.

Each family folder of `modadapt.adapters` defines its presets (`hf/presets.py`: `tiny-llama` etc.,
full `transformers` models built from a config in code; `timm/presets.py`: `tiny-vit`). They
register here through the `register_presets` hook, as a plugin's presets do; `build_preset`
builds any registered one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapters.hf import presets as hf_presets
from .adapters.timm import presets as timm_presets
from .hookspecs import Preset, hookimpl
from .plugins import get_preset, registry

#: The built-in presets' builders, by name (all registered presets: `preset_names()`).
PRESETS: dict[str, Callable[[], nn.Module]] = {
    preset.name: preset.build for preset in (*hf_presets.PRESETS, *timm_presets.PRESETS)
}


@hookimpl
def register_presets(register) -> None:
    for preset in (*hf_presets.PRESETS, *timm_presets.PRESETS):
        register(preset)


def preset_names() -> list[str]:
    """Every registered preset (built-in and from plugins), sorted."""
    return [entry.name for entry in registry().list("preset")]


def build_preset(name: str, seed: int = 0) -> nn.Module:
    """A preset model with weights drawn from `seed` (the same seed gives the same weights)."""
    preset: Preset = get_preset(name).obj
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = preset.build()
    return model.eval()
