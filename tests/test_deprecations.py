"""Names that moved stay importable from their old paths for one release, with a warning."""

from __future__ import annotations

import importlib

import pytest

import modadapt

MOVED = [
    ("modadapt.convert", "state_of", "modadapt.mod_layer"),
    ("modadapt.convert", "find_adapter", "modadapt.plugins"),
    ("modadapt.attention_probe", "probe", "modadapt.metrics.arank"),
    ("modadapt.graphed_decode", "GraphedDecoder", "modadapt.decoding"),
    ("modadapt.graphed_decode", "Sampling", "modadapt.decoding"),
    ("modadapt.graphed_decode", "flash_key", "modadapt.decoding.static_cache"),
    ("modadapt.adapters.hf_decoder", "HFDecoderAdapter", "modadapt.adapters.hf.decoder"),
    ("modadapt.adapters.llava", "role_stats", "modadapt.adapters.hf.llava"),
    ("modadapt.adapters.timm_vit", "create_model", "modadapt.adapters.timm.vit"),
    ("modadapt.kv_cache", "mod_cache_layer", "modadapt.adapters.hf.kv_cache"),
    ("modadapt.varlen", "transformers_varlen_attention", "modadapt.adapters.hf.attention"),
    ("modadapt.cli", "load_source_model", "modadapt.sources"),
    ("modadapt.cli", "TOKENIZER_FILES", "modadapt.sources"),
    ("modadapt.cli", "is_causal_lm", "modadapt.sources"),
    ("modadapt.cli", "parse_router_args", "modadapt.config"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_old_path_warns_and_gives_the_new_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_from_import_of_an_old_path_works():
    with pytest.warns(DeprecationWarning):
        from modadapt.convert import state_of  # noqa: F401


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'modadapt.convert' has no attribute 'nope'"):
        _ = importlib.import_module("modadapt.convert").nope


def test_a_renamed_private_name_of_the_old_decode_module_still_resolves():
    """Benchmarks read the decode attention's internals through the old module."""
    from modadapt.decoding import static_cache

    with pytest.warns(
        DeprecationWarning, match="graphed_decode._KeyLengths moved to modadapt.decoding.static_cache.KeyLengths"
    ):
        from modadapt.graphed_decode import _KeyLengths
    assert _KeyLengths is static_cache.KeyLengths
    with pytest.warns(DeprecationWarning):
        assert importlib.import_module("modadapt.graphed_decode")._FLASH is static_cache._FLASH


def test_the_old_cli_loader_keeps_its_signature():
    with pytest.warns(DeprecationWarning):
        from modadapt.cli import load_source_model
    model, files = load_source_model("tiny-llama")
    assert files == [] and model.config.model_type == "llama"
    with pytest.raises(modadapt.ModAdaptError, match="neither a local directory nor a preset"):
        load_source_model("no/such/dir")
