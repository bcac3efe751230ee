"""Bad input is a clear `ModAdaptError` naming the fix, and never leaves a half-changed model or a
half-written directory behind (DESIGN.md section 6, last invariant)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import SAVED_FILES
from safetensors.torch import load_file, save_file
from torch import nn

import modadapt
from modadapt import ModAdaptError, ModConfig
from modadapt.masks import subset_attention_mask
from modadapt.mod_layer import state_of
from modadapt.plugins import registry


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


def _assert_unchanged(model, snapshot):
    state, classes, hooks = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == classes
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert state_of(model) is None


def _tree(path):
    """Every file under `path` with its bytes (to prove a directory was left untouched)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# --- convert -------------------------------------------------------------------------------


BAD_CONVERT = {
    "unknown-router": (dict(router="no-such-router"), ["no-such-router", "installed routers"]),
    "unknown-router-argument": (dict(router="topk", router_kwargs={"bogus": 1}), ["bogus", "aux_coef", "causal_rule"]),
    "capacity-0": (dict(capacity=0), ["capacity", "(0, 1]"]),
    "capacity-1.5": (dict(capacity=1.5), ["capacity", "(0, 1]"]),
    "capacity-negative": (dict(capacity=-0.25), ["capacity", "(0, 1]"]),
    "capacity-nan": (dict(capacity=math.nan), ["capacity", "(0, 1]"]),
    "capacity-abc": (dict(capacity="abc"), ["capacity", "'abc'"]),
    "capacity-none": (dict(capacity=None), ["capacity"]),
    "layer-out-of-range": (dict(layers=[1, 4]), ["4", "out of range", "4 layers"]),
    "layer-negative": (dict(layers=[-1]), ["-1", "out of range"]),
    "layer-out-of-range-text": (dict(layers="1,9"), ["9", "out of range"]),
    "layer-0": (dict(layers=[0, 1]), ["layer 0", "from 1"]),
    "layer-0-text": (dict(layers="0"), ["layer 0"]),
    "empty-layer-list": (dict(layers=[]), ["empty"]),
    "empty-layer-text": (dict(layers=" "), ["empty"]),
    "layers-not-ints": (dict(layers=[1.5]), ["integers"]),
    "layers-bools": (dict(layers=[True]), ["integers"]),
    "layers-garbage": (dict(layers="1,x"), ["'1,x'", "every-other", "evenly:4"]),
    "layers-evenly-zero": (dict(layers="evenly:0"), ["'evenly:0'", "positive integer"]),
    "layers-evenly-garbage": (dict(layers="evenly:half"), ["'evenly:half'", "positive integer"]),
    "layers-evenly-too-many": (dict(layers="evenly:4"), ["evenly:4", "3 convertible", "1 to 3"]),
    "threshold-p-0": (dict(router="threshold-p", router_kwargs={"p": 0.0}), ["p must be in (0, 1)"]),
    "threshold-p-1": (dict(router="threshold-p", router_kwargs={"p": 1.0}), ["p must be in (0, 1)"]),
    "threshold-p-negative": (dict(router="threshold-p", router_kwargs={"p": -0.5}), ["p must be in (0, 1)"]),
    "threshold-p-1.5": (dict(router="threshold-p", router_kwargs={"p": 1.5}), ["p must be in (0, 1)"]),
    "threshold-alpha-negative": (dict(router="threshold-p", router_kwargs={"alpha": -1}), ["alpha"]),
    "threshold-gate": (dict(router="threshold-p", router_kwargs={"gate": "hard"}), ["gate", "straight-through"]),
    "topk-causal-rule": (dict(router="topk", router_kwargs={"causal_rule": "magic"}), ["causal_rule", "predictor"]),
    "topk-aux-coef-negative": (dict(router="topk", router_kwargs={"aux_coef": -0.1}), ["aux_coef"]),
    "topk-predictor-width": (
        dict(router="topk", router_kwargs={"causal_rule": "predictor", "predictor_hidden": 0}),
        ["predictor_hidden"],
    ),
    "inference-routing": (dict(inference_routing="sometimes"), ["inference_routing", "causal"]),
    "router-empty": (dict(router=""), ["router"]),
    "router-kwargs-not-dict": (dict(router_kwargs="p=0.3"), ["router_kwargs"]),
}


@pytest.mark.parametrize("overrides, fragments", list(BAD_CONVERT.values()), ids=list(BAD_CONVERT))
def test_bad_convert_is_a_clear_error_and_changes_nothing(tiny, ids, overrides, fragments):
    model = tiny("llama")
    snapshot = _snapshot(model)
    with pytest.raises(ModAdaptError) as info:
        modadapt.convert(model, **overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    _assert_unchanged(model, snapshot)
    # the model is still usable, and still convertible
    modadapt.convert(model, router="topk", capacity=0.5)
    with torch.no_grad():
        assert torch.isfinite(model(ids(1, 6)).logits).all()


def test_unknown_router_lists_every_installed_router(tiny):
    with pytest.raises(ModAdaptError) as info:
        modadapt.convert(tiny("llama"), router="topkk")
    installed = [entry.name for entry in registry().list("router")]
    assert {"topk", "threshold-p", "random"} <= set(installed)
    for name in installed:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "router, kwargs",
    [
        ("threshold-p", {"p": "abc"}),
        ("threshold-p", {"alpha": "abc"}),
        ("topk", {"aux_coef": "x"}),
        ("topk", {"causal_rule": "predictor", "predictor_hidden": "x"}),
        ("random", {"seed": "abc"}),
    ],
    ids=["threshold-p", "threshold-alpha", "topk-aux-coef", "topk-predictor-hidden", "random-seed"],
)
def test_router_argument_of_wrong_type_is_a_clear_error(tiny, router, kwargs):
    model = tiny("llama")
    with pytest.raises(ModAdaptError) as info:
        modadapt.convert(model, router=router, router_kwargs=kwargs)
    bad = next(name for name, value in kwargs.items() if value in ("abc", "x"))
    assert f"argument {bad!r}" in str(info.value)
    assert not hasattr(model, "_modadapt_state")  # nothing was converted


def test_modconfig_validates_on_its_own():
    with pytest.raises(ModAdaptError, match=r"\(0, 1\]"):
        ModConfig(capacity=2)
    with pytest.raises(ModAdaptError) as info:
        ModConfig.from_dict({"router": "topk", "capacty": 0.5, "zzz": 1})
    message = str(info.value)
    assert "capacty" in message and "zzz" in message
    for known in ("capacity", "layers", "router", "router_kwargs", "inference_routing"):
        assert known in message
    # a valid dict round-trips
    config = ModConfig(router="threshold-p", layers="1,3", router_kwargs={"p": 0.3})
    assert ModConfig.from_dict(config.to_dict()) == config
    assert config.layers == [1, 3]


def test_layer_rule_selecting_nothing():
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    for rule in ("every-other", "all-but-first", "evenly:1"):
        with pytest.raises(ModAdaptError, match="selects no layer"):
            modadapt.convert(model, layers=rule)
        assert state_of(model) is None


@pytest.mark.parametrize("kind", ["bert", "linear", "sequential"])
def test_unsupported_model_is_a_clear_error(kind):
    if kind == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
        )
        name = "BertModel"
    elif kind == "linear":
        model, name = nn.Linear(4, 4), "Linear"
    else:
        model, name = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "Sequential"
    snapshot = _snapshot(model)
    with pytest.raises(ModAdaptError) as info:
        modadapt.convert(model)
    message = str(info.value)
    assert "unsupported model" in message and name in message
    assert "hf-decoder" in message  # lists what is installed
    if kind == "bert":
        assert "'bert'" in message
    _assert_unchanged(model, snapshot)


def test_converting_twice_is_an_error_and_keeps_the_first_conversion(tiny, ids):
    model = tiny("llama")
    modadapt.convert(model, router="threshold-p", layers=[1])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModAdaptError, match="already converted.*unload"):
        modadapt.convert(model, router="topk", layers=[2])
    assert model.state_dict().keys() == snapshot.keys()
    assert [layer.mod_state.index for layer in modadapt.mod_layers(model)] == [1]
    assert state_of(model).config.router == "threshold-p"
    with torch.no_grad():
        model(ids(1, 5))
    assert len(modadapt.routing_stats(model)) == 1


def test_unconverted_model_errors(tiny):
    model = tiny("llama")
    for call in (modadapt.mod_layers, modadapt.unload, modadapt.routing_stats, modadapt.aux_loss):
        with pytest.raises(ModAdaptError, match="not converted"):
            call(model)


def test_unsupported_attention_kernel_is_named():
    with pytest.raises(ModAdaptError, match="sdpa"):
        subset_attention_mask(
            "flash_attention_2",
            query_index=torch.arange(3)[None],
            query_valid=None,
            past_index=None,
            past_valid=None,
            causal=True,
            window=None,
            span=3,
            dtype=torch.float32,
        )


def test_static_cache_is_a_clear_error(tiny, ids):
    model = modadapt.convert(tiny("llama"), router="threshold-p")
    with pytest.raises(ModAdaptError, match="DynamicCache"):
        with torch.no_grad():
            model.generate(ids(1, 5), max_new_tokens=2, cache_implementation="static")


def test_unknown_preset():
    with pytest.raises(ModAdaptError, match="tiny-llama"):
        modadapt.build_preset("tiny-nope")


# --- save ----------------------------------------------------------------------------------


@pytest.fixture
def converted(tiny, randomize_routers):
    model = modadapt.convert(tiny("llama"), router="threshold-p")
    return randomize_routers(model)


def test_saving_an_unconverted_model_is_an_error(tiny, tmp_path):
    with pytest.raises(ModAdaptError, match="convert"):
        modadapt.save(tiny("llama"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_saving_into_a_non_empty_directory_leaves_it_untouched(converted, tmp_path):
    target = tmp_path / "busy"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = _tree(target)
    with pytest.raises(ModAdaptError, match="not empty.*overwrite"):
        modadapt.save(converted, target)
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary sibling left


def test_saving_onto_a_file_is_an_error(converted, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with pytest.raises(ModAdaptError, match="not a directory"):
        modadapt.save(converted, target)
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_saving_into_an_empty_directory_works(converted, tmp_path, ids):
    target = tmp_path / "empty"
    target.mkdir()
    modadapt.save(converted, target)
    loaded = modadapt.load(target)
    with torch.no_grad():
        assert torch.equal(loaded(ids(1, 6)).logits, converted(ids(1, 6)).logits)


def test_failed_save_leaves_no_temporary_directory(converted, tmp_path):
    with pytest.raises(FileNotFoundError):
        modadapt.save(converted, tmp_path / "out", extra_files=[str(tmp_path / "missing-tokenizer.json")])
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_save(converted, tmp_path, ids):
    target = tmp_path / "out"
    modadapt.save(converted, target)
    before = _tree(target)
    with torch.no_grad():
        converted.model.layers[1].router.scorer.weight.mul_(-1)  # a different model to save over it
    with pytest.raises(FileNotFoundError):
        modadapt.save(converted, target, overwrite=True, extra_files=[str(tmp_path / "missing.json")])
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    modadapt.load(target)  # still a complete, loadable save


def test_overwrite_replaces_an_earlier_save_only(converted, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(ModAdaptError, match="not written by modadapt"):  # not modadapt's: never deleted
        modadapt.save(converted, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["stale.txt"]
    (target / "stale.txt").unlink()
    modadapt.save(converted, target)
    modadapt.save(converted, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == SAVED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- load ----------------------------------------------------------------------------------


@pytest.fixture
def saved(converted, tmp_path):
    return modadapt.save(converted, tmp_path / "saved")


def _meta(saved):
    return json.loads((saved / "modadapt.json").read_text())


def _write_meta(saved, meta):
    (saved / "modadapt.json").write_text(json.dumps(meta))


def test_load_of_a_missing_or_foreign_directory(tmp_path):
    with pytest.raises(ModAdaptError, match="not a directory"):
        modadapt.load(tmp_path / "nowhere")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    with pytest.raises(ModAdaptError, match="modadapt.json"):
        modadapt.load(tmp_path / "foreign")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{not json", "corrupt"),
        (b"\xff\xfe\x00garbage", "corrupt"),
        (b"", "corrupt"),
        (b"[1, 2]", "corrupt"),
        (b'{"format": 1}', "lacks"),
    ],
    ids=["bad-json", "not-utf8", "empty", "a-list", "missing-keys"],
)
def test_corrupt_metadata(saved, content, fragment):
    (saved / "modadapt.json").write_bytes(content)
    with pytest.raises(ModAdaptError, match=fragment):
        modadapt.load(saved)


def test_metadata_from_a_newer_format(saved):
    _write_meta(saved, {**_meta(saved), "format": 99, "modadapt_version": "9.0"})
    with pytest.raises(ModAdaptError, match="Upgrade modadapt"):
        modadapt.load(saved)


@pytest.mark.parametrize("edit", [{"format": "1"}, {"mod_config": None}], ids=["format-str", "config-null"])
def test_wrongly_typed_metadata_is_a_clear_error(saved, edit):
    _write_meta(saved, {**_meta(saved), **edit})
    with pytest.raises(ModAdaptError):
        modadapt.load(saved)


def test_metadata_with_an_unknown_adapter_or_router(saved):
    meta = _meta(saved)
    _write_meta(saved, {**meta, "adapter": "no-such-adapter"})
    with pytest.raises(ModAdaptError, match="unknown adapter 'no-such-adapter'.*hf-decoder"):
        modadapt.load(saved)
    _write_meta(saved, {**meta, "mod_config": {**meta["mod_config"], "router": "no-such-router"}})
    with pytest.raises(ModAdaptError, match="unknown router 'no-such-router'"):
        modadapt.load(saved)
    _write_meta(saved, {**meta, "mod_config": {**meta["mod_config"], "surprise": 1}})
    with pytest.raises(ModAdaptError, match="surprise"):
        modadapt.load(saved)
    _write_meta(saved, {**meta, "architecture": {**meta["architecture"], "class": "NoSuchModelForCausalLM"}})
    with pytest.raises(ModAdaptError, match="NoSuchModelForCausalLM"):
        modadapt.load(saved)
    _write_meta(saved, {**meta, "architecture": None})
    with pytest.raises(ModAdaptError, match="architecture"):
        modadapt.load(saved)


def test_missing_config_is_a_clear_error(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ModAdaptError, match="rebuild"):
        modadapt.load(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModAdaptError, match="model.safetensors"):
        modadapt.load(saved)


def test_corrupt_weights_file(saved):
    (saved / "model.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ModAdaptError, match="corrupt"):
        modadapt.load(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModAdaptError, match="model.safetensors"):
        modadapt.load(saved)


ROUTER_KEY = "model.layers.1.router.scorer.weight"


@pytest.mark.parametrize("edit", ["drop-router", "wrong-shape", "extra-key", "drop-base"])
def test_mismatched_weights(saved, edit):
    weights = load_file(saved / "model.safetensors")
    assert ROUTER_KEY in weights
    if edit == "drop-router":
        del weights[ROUTER_KEY]
        fragment = ROUTER_KEY
    elif edit == "wrong-shape":
        weights[ROUTER_KEY] = torch.zeros(1, 7)
        fragment = ROUTER_KEY
    elif edit == "extra-key":
        weights["model.layers.2.router.scorer.weight"] = torch.zeros(1, 64)
        fragment = "model.layers.2.router.scorer.weight"
    else:
        del weights["model.layers.0.mlp.up_proj.weight"]
        fragment = "model.layers.0.mlp.up_proj.weight"
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModAdaptError) as info:
        modadapt.load(saved)
    assert "does not match" in str(info.value)
    assert fragment in str(info.value)


def test_metadata_layers_disagreeing_with_weights(saved):
    meta = _meta(saved)
    _write_meta(saved, {**meta, "mod_config": {**meta["mod_config"], "layers": [1, 2]}})
    with pytest.raises(ModAdaptError, match="does not match"):
        modadapt.load(saved)


def test_unknown_convert_option_and_boolean_capacity_are_clear_errors(tiny):
    model = tiny("llama")
    with pytest.raises(ModAdaptError, match="unknown option 'bogus'.*capacity"):
        modadapt.convert(model, bogus=1)
    with pytest.raises(ModAdaptError, match="capacity must be a number"):
        modadapt.convert(model, capacity=True)
    assert not hasattr(model, "_modadapt_state")


@pytest.mark.parametrize(
    "kind, rule, expected",
    [
        ("llama", "evenly:1", [2]),  # 4 layers: 1..3, the middle one
        ("llama", "evenly:3", [1, 2, 3]),
        ("llama", "all-but-first", [1, 2, 3]),
        ("llama", "every-other", [1, 3]),
        ("gemma2", "evenly:2", [1, 3]),  # layers 0 and 2 are the first of their attention type
        ("gemma2", "evenly:1", [3]),
        ("gemma2", "all-but-first", [1, 3]),
    ],
)
def test_layer_rules(tiny, kind, rule, expected):
    model = modadapt.convert(tiny(kind), layers=rule)
    assert state_of(model).layer_indices == expected


def test_evenly_spaced_matches_layer_deletion_placement_and_passes_over_dense_layers():
    from modadapt.config import evenly_spaced, resolve_layers

    assert resolve_layers("evenly:6", 12) == [1, 3, 5, 7, 9, 11]
    assert resolve_layers("evenly:4", 12) == [2, 5, 7, 10]
    assert resolve_layers("evenly:11", 12) == list(range(1, 12))
    # a family that keeps layers dense: still N layers, spread over the convertible ones
    assert resolve_layers("evenly:3", 12, [2, 3, 4, 6, 7, 8, 9, 10, 11]) == [3, 7, 10]
    assert evenly_spaced(2, [5, 9]) == [5, 9]
