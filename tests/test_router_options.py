"""Typed router options: conversion, validation, help text, the old declaration style."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields

import pytest
import torch

import modadapt
from modadapt.cli import main
from modadapt.plugins import registry
from modadapt.routers.base import Router
from modadapt.routers.options import RouterOptions, calibrated_option, option, parse_options
from modadapt.routers.random import RandomOptions
from modadapt.routers.threshold import ThresholdOptions
from modadapt.routers.topk import TopKOptions


def test_every_registered_router_documents_each_option():
    for entry in registry().list("router"):
        assert issubclass(entry.obj.Options, RouterOptions), entry.name
        for f in fields(entry.obj.Options):
            assert f.metadata.get("help"), f"{entry.name}: option {f.name} has no help text"


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"p": "0.4"}, {"p": 0.4}),
        ({"alpha": 1}, {"alpha": 1.0}),
        ({"target": "none"}, {"target": None}),
        ({"target": None, "gate": "sigmoid"}, {"target": None, "gate": "sigmoid"}),
    ],
)
def test_values_are_converted_to_the_declared_types(given, expected):
    options = parse_options(ThresholdOptions, "threshold-p", given)
    for name, value in expected.items():
        assert options[name] == value and type(options[name]) is type(value)
    assert asdict(parse_options(ThresholdOptions, "threshold-p", {})) == {
        "p": 0.5,
        "alpha": 0.01,
        "gate": "straight-through",
        "target": 0.5,
    }


def test_ints_bools_and_calibrated_cutoffs():
    options = parse_options(TopKOptions, "topk", {"predictor_hidden": 8.0, "causal_threshold": "calibrated"})
    assert options.predictor_hidden == 8 and type(options.predictor_hidden) is int
    assert options.causal_threshold is None
    assert calibrated_option(TopKOptions) == ("causal_threshold", 0.0)
    assert parse_options(RandomOptions, "random", {"resample": "false"}).resample is False


@pytest.mark.parametrize(
    "router, kwargs, message",
    [
        ("threshold-p", {"p": 1.0}, "threshold-p: p must be in (0, 1), got 1.0."),
        ("threshold-p", {"target": 2}, "threshold-p: target must be in [0, 1] or 'none', got 2.0."),
        ("threshold-p", {"gate": "hard"}, "threshold-p: gate must be 'straight-through' or 'sigmoid', got 'hard'."),
        ("topk", {"predictor_hidden": 0}, "topk: predictor_hidden must be >= 1, got 0."),
        ("topk", {"causal_threshold": "high"}, "argument 'causal_threshold' must be a number, or none / calibrated"),
        ("attention", {"chunk": 0}, "attention: chunk must be >= 1, got 0."),
        ("random", {"seed": 1.5}, "router 'random': argument 'seed' must be a int (like its default 0), got 1.5."),
        (
            "shared-vl",
            {"colour": "red"},
            "router 'shared-vl' has no argument 'colour'; its arguments are: aux_coef, causal_threshold, per_layer.",
        ),
    ],
)
def test_bad_values_are_one_clear_error(router, kwargs, message):
    with pytest.raises(modadapt.ModAdaptError) as err:
        modadapt.convert(modadapt.build_preset("tiny-llama"), router=router, router_kwargs=kwargs)
    assert message in str(err.value)


def test_list_routers_prints_each_option_with_help_and_default(capsys):
    assert main(["list", "routers"]) == 0
    out = capsys.readouterr().out
    assert "    p=0.5 (float; in (0, 1)): keep a token iff sigmoid(w.x + b) >= p" in out
    assert "    resample=true (bool): " in out
    assert main(["list", "routers", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    topk = {opt["name"]: opt for opt in rows["topk"]["options"]}
    assert topk["causal_threshold"]["default"] == "calibrated"
    assert topk["causal_threshold"]["type"] == "float | calibrated"
    assert topk["causal_rule"]["allowed"] == "'aux' or 'predictor'" and topk["causal_rule"]["help"]


def test_a_router_declared_the_old_way_still_works():
    with pytest.warns(DeprecationWarning, match="RouterOptions"):

        class OldRouter(Router):
            name = "old"
            arguments = {"bias": 0.0, "cutoff": None, "target": 0.5, "steps": 3}
            nullable = ("target",)
            causal_cutoff = ("cutoff", 0.25)

            def score(self, hidden, ctx):
                return hidden[..., 0]

            def causal_keep(self, logits, hidden, ctx):
                return logits >= self.causal_threshold(ctx.layer_index)

    router = OldRouter(8, 0.5, 1, bias="1.5", target="none", steps=4.0)
    assert (router.options["bias"], router.options["target"], router.options["steps"]) == (1.5, None, 4)
    assert router.options["cutoff"] is None and OldRouter.causal_cutoff == ("cutoff", 0.25)
    assert float(router.causal_threshold(1)) == 0.25  # the fallback until calibrated
    with pytest.raises(modadapt.ModAdaptError, match="router 'old' has no argument 'nope'"):
        OldRouter(8, 0.5, 1, nope=1)


def test_a_router_declared_with_options_emits_no_warning():
    @dataclass(frozen=True)
    class NewOptions(RouterOptions):
        bias: float = option(0.0, "added to every score")

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class NewRouter(Router):
            name = "new"
            Options = NewOptions

            def score(self, hidden, ctx):
                return hidden[..., 0] + self.options.bias

            def causal_keep(self, logits, hidden, ctx):
                return logits > 0

    assert NewRouter.arguments == {"bias": 0.0} and NewRouter.causal_cutoff is None
    assert NewRouter(4, 0.5, 1, bias=2).score(torch.zeros(1, 3, 4), None).tolist() == [[2.0, 2.0, 2.0]]


def test_directories_saved_with_spelt_out_values_still_load(tmp_path):
    model = modadapt.convert(
        modadapt.build_preset("tiny-llama"), router="threshold-p", router_kwargs={"target": "none", "p": "0.4"}
    )
    modadapt.save(model, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "modadapt.json").read_text())
    assert meta["mod_config"]["router_kwargs"] == {"target": "none", "p": "0.4"}  # stored as the user gave them
    loaded = modadapt.load(tmp_path / "saved")
    assert modadapt.mod_layers(loaded)[0].router.options.target is None
