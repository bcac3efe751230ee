"""Adaptation schedules (compute warm-up, router stage) and topk's tanh gate."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, lm_adapt_config, make_ids

import modadapt
from modadapt.errors import ModAdaptError
from modadapt.recipes.lm_adapt import run
from modadapt.recipes.schedule import AdaptationSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


config = lm_adapt_config


def test_capacity_warms_up_from_dense_to_the_target(tmp_path):
    summary = run(config(tmp_path, capacity_warmup=4))
    kept = summary["history"]["kept_fraction"]  # train-mode top-k of 32 tokens per step
    assert kept[0] == 1.0 and kept[4:] == [0.25, 0.25]
    assert all(a > b for a, b in zip(kept[:5], kept[1:5]))  # falls every step until the target
    model = modadapt.load(tmp_path / "run" / "model")
    assert {layer.router.capacity for layer in modadapt.mod_layers(model)} == {0.25}  # saved at its target


def test_threshold_target_warms_up():
    model = modadapt.convert(build_tiny(), router="threshold-p", layers=[1, 3], router_kwargs={"target": 0.4})
    schedule = AdaptationSchedule(model, capacity_warmup=10)
    schedule.apply(5)
    assert [layer.router.target for layer in modadapt.mod_layers(model)] == [pytest.approx(0.7)] * 2
    schedule.apply(12)
    assert [layer.router.target for layer in modadapt.mod_layers(model)] == [pytest.approx(0.4)] * 2
    schedule.apply(0)
    schedule.finish()
    assert [layer.router.target for layer in modadapt.mod_layers(model)] == [0.4, 0.4]
    untargeted = modadapt.convert(build_tiny(), router="threshold-p", layers=[1], router_kwargs={"target": None})
    with pytest.raises(ModAdaptError, match="target share"):
        AdaptationSchedule(untargeted, capacity_warmup=10)


def test_router_stage_moves_only_the_routers():
    model = modadapt.convert(build_tiny(), router="topk", capacity=0.5, layers=[1, 3]).train()
    params = list(model.parameters())
    schedule = AdaptationSchedule(model, router_steps=2)
    ids = make_ids(2, 16)
    for step, routers_only in ((0, True), (1, True), (2, False)):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        schedule.hold_base(step, params)
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert any(".router." in name for name in with_grad)
        assert all(".router." in name for name in with_grad) == routers_only


def test_router_stage_in_the_recipe(tmp_path, monkeypatch):
    seen = []  # per optimizer step: whether anything but the routers still had a gradient
    hold = AdaptationSchedule.hold_base

    def spy(self, step, params):
        hold(self, step, params)
        seen.append(any(p.grad is not None for p in params if id(p) not in self.router_params))

    monkeypatch.setattr(AdaptationSchedule, "hold_base", spy)
    torch.manual_seed(0)
    dense = build_tiny()
    summary = run(config(tmp_path, router_steps=5, lr=1e-2), model=copy.deepcopy(dense))
    assert summary["steps"] == 6 and seen == [False] * 5 + [True]
    saved = modadapt.unload(modadapt.load(tmp_path / "run" / "model")).state_dict()
    changed = [name for name, value in dense.state_dict().items() if not torch.equal(value, saved[name])]
    assert changed  # the last step trains the model
    with pytest.raises(ModAdaptError, match="router_steps"):
        config(tmp_path, router_steps=6)
    with pytest.raises(ModAdaptError, match="train: all or train: lora"):
        config(tmp_path, router_steps=2, train="routers")
    with pytest.raises(ModAdaptError, match="capacity_warmup"):
        config(tmp_path, capacity_warmup=-1)


def test_tanh_gate_starts_dense_and_learns():
    dense = build_tiny()
    ids = make_ids(2, 16)
    model = modadapt.convert(
        copy.deepcopy(dense), router="topk", capacity=1.0, layers=[1, 3], router_kwargs={"gate": "tanh"}
    )
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, dense.eval()(input_ids=ids).logits)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    router = modadapt.mod_layers(model)[0].router
    assert router.scorer.weight.grad is not None and router.scorer.weight.grad.abs().sum() > 0
    gate = router.gate(torch.tensor([[-50.0, 0.0, 50.0]]))
    assert torch.allclose(gate, torch.tensor([[0.8, 1.0, 1.2]]))
    with pytest.raises(ModAdaptError, match="gate"):
        modadapt.convert(copy.deepcopy(dense), router="topk", router_kwargs={"gate": "raw"})
