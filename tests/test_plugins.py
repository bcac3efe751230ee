"""The plugin registry: a real entry point registers a third-party router that converts by name."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import modadapt
from modadapt.plugins import registry
from modadapt.testing import RouterConformance

PLUGIN_SOURCE = textwrap.dedent(
    '''
    import torch
    from modadapt import Router, hookimpl


    class EveryOtherRouter(Router):
        """Keeps even positions: a toy third-party router."""

        name = "every-other-token"
        causal = True
        capacity_based = False

        def score(self, hidden, ctx):
            return (ctx.positions % 2 == 0).float()

        def causal_keep(self, logits, hidden, ctx):
            return logits > 0

        def gate(self, logits):
            return None


    @hookimpl
    def register_routers(register):
        register(EveryOtherRouter)
    '''
)


def install_fake_plugin(root, dist="fake-router-plugin", module="fake_router_plugin", source=PLUGIN_SOURCE):
    """A real installed distribution: a module plus a dist-info with an entry point, on sys.path."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[modadapt]\n{module} = {module}\n")


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    install_fake_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MODADAPT_NO_PLUGINS", raising=False)
    monkeypatch.delenv("MODADAPT_PLUGINS", raising=False)
    registry(reload=True)
    yield tmp_path
    sys.modules.pop("fake_router_plugin", None)
    monkeypatch.undo()
    registry(reload=True)


def test_third_party_router_converts_by_name(fake_plugin):
    entry = registry().get("router", "every-other-token")
    assert entry.provider == "fake-router-plugin"
    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(model, router="every-other-token", layers=[1, 2])
    model(torch.randint(0, 256, (1, 8)))
    keep = modadapt.mod_layers(model)[0].mod_state.last_keep
    assert keep[0].tolist() == [True, False] * 4


def test_cli_lists_plugin_with_provider(fake_plugin):
    env = {**os.environ, "PYTHONPATH": str(fake_plugin)}
    out = subprocess.run(
        [sys.executable, "-m", "modadapt.cli", "list", "routers", "--json"],
        env=env, capture_output=True, text=True, check=True,
    )
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["every-other-token"]["provider"] == "fake-router-plugin"
    assert rows["topk"]["provider"] == "modadapt"
    plugins = subprocess.run(
        [sys.executable, "-m", "modadapt.cli", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    names = {row["name"]: row for row in json.loads(plugins.stdout)}
    assert names["fake_router_plugin"]["provider"] == "fake-router-plugin"
    assert names["fake_router_plugin"]["hooks"] == ["register_routers"]


def test_no_plugins_switch(fake_plugin, monkeypatch):
    monkeypatch.setenv("MODADAPT_NO_PLUGINS", "1")
    reg = registry(reload=True)
    assert "every-other-token" not in {e.name for e in reg.list("router")}
    assert {e.name for e in reg.list("router")} >= {"topk", "threshold-p", "random"}


def test_only_named_plugins_switch(fake_plugin, monkeypatch):
    monkeypatch.setenv("MODADAPT_PLUGINS", "some-other-plugin")
    assert "every-other-token" not in {e.name for e in registry(reload=True).list("router")}
    monkeypatch.setenv("MODADAPT_PLUGINS", "fake_router_plugin")
    assert "every-other-token" in {e.name for e in registry(reload=True).list("router")}


def test_duplicate_name_names_both_providers(tmp_path, monkeypatch):
    clash = PLUGIN_SOURCE.replace('name = "every-other-token"', 'name = "topk"')
    install_fake_plugin(tmp_path, dist="clashing-plugin", module="clashing_plugin", source=clash)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MODADAPT_NO_PLUGINS", raising=False)
    with pytest.raises(modadapt.ModAdaptError) as err:
        registry(reload=True)
    assert "modadapt" in str(err.value) and "clashing-plugin" in str(err.value)
    sys.modules.pop("clashing_plugin", None)
    monkeypatch.undo()
    registry(reload=True)


def test_misspelled_hook_is_caught(tmp_path, monkeypatch):
    bad = PLUGIN_SOURCE.replace("def register_routers(", "def register_router(")
    install_fake_plugin(tmp_path, dist="typo-plugin", module="typo_plugin", source=bad)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MODADAPT_NO_PLUGINS", raising=False)
    with pytest.raises(Exception, match="register_router"):
        registry(reload=True)
    sys.modules.pop("typo_plugin", None)
    monkeypatch.undo()
    registry(reload=True)


def test_unknown_router_lists_installed():
    with pytest.raises(modadapt.ModAdaptError, match=r"unknown router 'nope'.*topk \(modadapt\)"):
        modadapt.convert(modadapt.build_preset("tiny-llama"), router="nope")


def test_every_hook_is_documented():
    from modadapt.plugins import HookSpecs

    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "plugins.md")).read()
    hooks = [name for name in vars(HookSpecs) if name.startswith("register_")]
    assert hooks
    for name in hooks:
        assert f"`{name}" in docs, f"hook {name} is not documented in docs/plugins.md"


class TestBuiltinTopkConformance(RouterConformance):
    router_name = "topk"


class TestBuiltinThresholdConformance(RouterConformance):
    router_name = "threshold-p"


class TestBuiltinRandomConformance(RouterConformance):
    router_name = "random"
