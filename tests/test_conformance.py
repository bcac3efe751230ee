"""Every registered router on every registered preset, through the shipped conformance kits.

The cases come from the registry, not from lists typed here: a new built-in or an installed
plugin router or preset is checked like the others.
"""

from __future__ import annotations

import pytest

from modadapt.plugins import registry
from modadapt.testing import AdapterConformance

CASES = [(router.name, preset.name) for router in registry().list("router") for preset in registry().list("preset")]


class TestEveryRouterOnEveryPreset(AdapterConformance):
    @pytest.fixture(autouse=True, params=CASES, ids=[f"{router}-on-{preset}" for router, preset in CASES])
    def _case(self, request):
        self.router_name, self.preset = request.param


def test_every_builtin_router_and_preset_is_covered():
    routers = {router for router, _ in CASES}
    presets = {preset for _, preset in CASES}
    assert {"topk", "threshold-p", "random", "attention", "shared-vl"} <= routers
    assert {"tiny-llama", "tiny-gpt2", "tiny-vit", "tiny-llava"} <= presets
