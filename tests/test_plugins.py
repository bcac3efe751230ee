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
        env=env,
        capture_output=True,
        text=True,
        check=True,
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
    from modadapt.hookspecs import HookSpecs

    docs_dir = os.path.join(os.path.dirname(__file__), "..", "docs", "plugins")
    hooks_doc = open(os.path.join(docs_dir, "hooks.md")).read()
    hooks = [name for name in vars(HookSpecs) if not name.startswith("_")]
    assert {"register_routers", "register_adapters", "register_presets", "register_recipes"} <= set(hooks)
    for name in hooks:
        assert f"`{name}(register)`" in hooks_doc, f"hook {name} is not documented in docs/plugins/hooks.md"
        assert getattr(HookSpecs, name).__doc__, f"hook {name} has no docstring"
    for page in ("routers", "adapters", "presets", "recipes"):
        assert os.path.isfile(os.path.join(docs_dir, f"{page}.md")), page


def load_plugin(tmp_path, monkeypatch, source, dist="test-plugin", module="test_plugin"):
    """Install `source` as the only external plugin and reload the registry (the caller restores it)."""
    install_fake_plugin(tmp_path, dist=dist, module=module, source=textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MODADAPT_NO_PLUGINS", raising=False)
    monkeypatch.setenv("MODADAPT_PLUGINS", module)
    return registry(reload=True)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """`plugin(source)` loads a plugin module; the registry is restored afterwards."""
    yield lambda source, **kw: load_plugin(tmp_path, monkeypatch, source, **kw)
    sys.modules.pop("test_plugin", None)
    monkeypatch.undo()
    registry(reload=True)


@pytest.mark.parametrize(
    "body, reason",
    [
        (
            "class Bad(Router):\n    name = 'bad'\n    def score(self, hidden, ctx):\n        return hidden[..., 0]\n",
            "Bad does not implement `causal_keep`",
        ),
        ("class Bad:\n    name = 'bad'\n", "is not a subclass of modadapt.Router"),
        ("class Bad(Router):\n    name = 'bad'\n    causal = 'yes'\n", "Bad.causal must be True or False"),
    ],
    ids=["missing-method", "not-a-router", "bad-flag"],
)
def test_router_breaking_the_contract_is_refused(plugin, body, reason):
    source = (
        f"from modadapt import Router, hookimpl\n{body}\n"
        "@hookimpl\ndef register_routers(register):\n    register(Bad)\n"
    )
    with pytest.raises(modadapt.ModAdaptError) as err:
        plugin(source)
    message = str(err.value)
    assert "\n" not in message and reason in message and "test-plugin" in message and "router" in message


SHADOWING_ADAPTER = """
from modadapt import hookimpl
from modadapt.adapters.hf import HFDecoderAdapter


class ShadowAdapter(HFDecoderAdapter):
    name = "aaa-decoder"  # sorts before hf-decoder


@hookimpl
def register_adapters(register):
    register(ShadowAdapter)
"""


def test_two_adapters_claiming_a_model_is_an_error_naming_both(plugin, tmp_path):
    plugin(SHADOWING_ADAPTER)
    model = modadapt.build_preset("tiny-llama")
    with pytest.raises(modadapt.ModAdaptError) as err:
        modadapt.convert(model, router="random", capacity=0.5)
    message = str(err.value)
    assert "'aaa-decoder' (test-plugin)" in message and "'hf-decoder' (modadapt)" in message
    assert "adapter=" in message
    modadapt.convert(model, router="random", capacity=0.5, adapter="hf-decoder")
    assert modadapt.mod_layer.state_of(model).adapter.name == "hf-decoder"
    modadapt.save(model, tmp_path / "saved")
    loaded = modadapt.load(tmp_path / "saved")  # the saved adapter is chosen explicitly
    assert modadapt.mod_layer.state_of(loaded).adapter.name == "hf-decoder"
    with pytest.raises(modadapt.ModAdaptError, match="adapter 'timm-vit' does not handle LlamaForCausalLM"):
        modadapt.convert(modadapt.build_preset("tiny-llama"), adapter="timm-vit")


PRESET_AND_RECIPE = '''
"""A toy recipe: prints its argument."""
from modadapt import Preset, Recipe, hookimpl


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=1)


def main(args):
    print(f"toy recipe ran {args.steps} steps")
    return 0


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@hookimpl
def register_presets(register):
    register(Preset("tiny-toy", build, "a two-layer Llama"))


@hookimpl
def register_recipes(register):
    register(Recipe("toy", "test_plugin"))
'''


def test_plugin_preset_and_recipe(plugin, capsys):
    from modadapt.cli import main
    from modadapt.sources import load_model

    reg = plugin(PRESET_AND_RECIPE)
    assert reg.get("preset", "tiny-toy").provider == "test-plugin"
    a, b = modadapt.build_preset("tiny-toy", seed=3), modadapt.build_preset("tiny-toy", seed=3)
    assert a.config.num_hidden_layers == 2 and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert load_model("tiny-toy").model.config.hidden_size == 32
    assert main(["list", "presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny-toy"]["summary"] == "a two-layer Llama" and rows["tiny-llama"]["provider"] == "modadapt"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("toy", "lm-adapt", "vit-imagenet", "llava-adapt"))
    assert main(["train", "toy", "--steps", "3"]) == 0
    assert "toy recipe ran 3 steps" in capsys.readouterr().out


def test_preset_or_recipe_of_the_wrong_type_is_refused(plugin):
    source = (
        "from modadapt import hookimpl\n"
        "@hookimpl\ndef register_presets(register):\n    register(lambda: None, name='x')\n"
    )
    with pytest.raises(modadapt.ModAdaptError, match="a preset that breaks its contract: .* is not a modadapt.Preset"):
        plugin(source)


def test_extra_flops_is_part_of_the_router_contract():
    model = modadapt.convert(modadapt.build_preset("tiny-llama"), router="topk")
    assert all(
        layer.router.extra_flops() == 0 == layer.router.extra_flops(matmul_only=True)
        for layer in modadapt.mod_layers(model)
    )


PEEKING_ROUTER = """
from modadapt import Router, hookimpl


class PeekingRouter(Router):
    \"\"\"Claims to be causal but keeps tokens above the row's mean: it looks ahead.\"\"\"

    name = "peeking"
    causal = True
    capacity_based = False

    def score(self, hidden, ctx):
        return hidden[..., 0]

    def causal_keep(self, logits, hidden, ctx):
        return logits >= logits.mean(dim=1, keepdim=True)

    def gate(self, logits):
        return None


@hookimpl
def register_routers(register):
    register(PeekingRouter)
"""


def test_conformance_kit_catches_a_router_that_looks_ahead(plugin):
    plugin(PEEKING_ROUTER)
    kit = RouterConformance()
    kit.router_name = "peeking"
    kit.test_shapes_and_registry()
    with pytest.raises(AssertionError):
        kit.test_cached_decode_equals_full_forward()


def test_readme_routers_table_lists_every_builtin_router_and_argument():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `")}
    for entry in registry().list("router"):
        if entry.provider != "modadapt":
            continue
        assert entry.name in rows, f"README's routers table has no row for {entry.name}"
        for argument in entry.obj.arguments:
            assert f"`{argument}=" in rows[entry.name], f"README: {entry.name} row does not list {argument}"
