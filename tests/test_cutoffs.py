"""`modadapt.calibrate_cutoffs`: the calibrated causal cut-offs set for the routing inference uses.

Checked: after it, every MoD layer keeps exactly `ceil(capacity * n)` of the calibration batches'
routed tokens under the causal rule (where training's running average, recorded under top-k
routing upstream, does not), per token for `topk` (with a predictor's rule, with padding), per
expert slot for `noop-expert`, per layer of one shared `shared-vl` router; a fixed cut-off stays;
a `inference_routing='topk'` model is restored; and the errors, with the model left as it was.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_ids, randomize_router_weights

import modadapt
from modadapt.errors import ModAdaptError
from modadapt.routers.base import kept_count

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(model, steps=4):
    """Training forwards (no optimizer step): each cut-off becomes training's running average."""
    model.train()
    for step in range(steps):
        x = make_ids(4, 24, seed=50 + step)
        model(x, labels=x)
    return model.eval()


def _kept_per_layer(model, batches):
    """Tokens (and routed tokens) each MoD layer kept over `batches`, eval mode, causal rules."""
    kept, routed = {}, {}
    with torch.no_grad():
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            model(**batch) if isinstance(batch, dict) else model(batch)
            for layer in modadapt.mod_layers(model):
                i = layer.mod_state.index
                keep = layer.mod_state.last_keep if mask is None else layer.mod_state.last_keep & mask.bool()
                kept[i] = kept.get(i, 0) + int(keep.sum())
                routed[i] = routed.get(i, 0) + (keep.numel() if mask is None else int(mask.sum()))
    return kept, routed


def _topk_model(tiny, **config):
    model = tiny("llama")
    modadapt.convert(model, router="topk", capacity=0.25, layers="all-but-first", **config)
    return _trained(randomize_router_weights(model, scale=0.5))


def test_every_layer_keeps_its_capacity_under_the_causal_rule(tiny):
    model = _topk_model(tiny)
    batches = [make_ids(3, 32, seed=s) for s in range(3)]
    kept, routed = _kept_per_layer(model, batches)
    targets = {i: kept_count(0.25, n) for i, n in routed.items()}
    assert kept != targets  # training's running average is off on these batches
    found = modadapt.calibrate_cutoffs(model, batches)
    assert sorted(found) == sorted(targets)
    kept, _ = _kept_per_layer(model, batches)
    assert kept == targets
    for layer in modadapt.mod_layers(model):  # recorded as calibrated, saved with the model
        router = layer.router
        assert float(router.calibrated_threshold[0]) == pytest.approx(found[layer.mod_state.index])
        assert int(router.calibration_steps[0]) >= 1
    assert not model.training


def test_a_predictor_rule_and_padded_rows(tiny):
    model = _topk_model(tiny, router_kwargs={"causal_rule": "predictor"})
    ids = make_ids(4, 20, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: padded tokens are not routed, so they do not count
    mask[3, :12] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    modadapt.calibrate_cutoffs(model, batches)
    kept, routed = _kept_per_layer(model, batches)
    assert kept == {i: kept_count(0.25, n) for i, n in routed.items()}


def test_noop_expert_keeps_its_share_of_slots(tiny):
    model = tiny("mixtral")
    modadapt.convert(model, router="noop-expert", capacity=0.5, layers="all-but-first")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in modadapt.mod_layers(model):
            w = layer.router.scorer.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 0.05)
    _trained(model)
    batches = [make_ids(2, 24, seed=s) for s in range(2)]
    modadapt.calibrate_cutoffs(model, batches)
    slots, total = {}, {}
    top_k = model.config.num_experts_per_tok
    with torch.no_grad():
        for batch in batches:
            model(batch)
            for layer in modadapt.mod_layers(model):
                i = layer.mod_state.index
                slots[i] = slots.get(i, 0) + int(layer.mod_state.last_slots.sum())
                total[i] = total.get(i, 0) + batch.numel() * top_k
    assert slots == {i: kept_count(0.5, n) for i, n in total.items()}


def test_one_shared_router_gets_a_cut_off_per_layer(tiny):
    model = tiny("llama")
    modadapt.convert(model, router="shared-vl", capacity=0.3, layers="all-but-first")
    with torch.no_grad():
        classifier = modadapt.mod_layers(model)[0].router.classifier
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=torch.Generator().manual_seed(1)))
    _trained(model)
    batches = [make_ids(2, 30, seed=7)]
    found = modadapt.calibrate_cutoffs(model, batches)
    assert len(set(found.values())) == len(found) > 1  # one router, a cut-off of its own per layer
    kept, routed = _kept_per_layer(model, batches)
    assert kept == {i: kept_count(0.3, n) for i, n in routed.items()}


def test_topk_inference_routing_is_restored(tiny):
    model = _topk_model(tiny, inference_routing="topk")
    batches = [make_ids(2, 16, seed=1)]
    modadapt.calibrate_cutoffs(model, batches)
    assert modadapt.mod_layers(model)[0].mod_state.model.config.inference_routing == "topk"


def test_a_fixed_cut_off_stays(tiny):
    model = tiny("llama")
    modadapt.convert(model, router="topk", capacity=0.25, layers="1,2", router_kwargs={"causal_threshold": 0.0})
    with pytest.raises(ModAdaptError, match="no MoD layer has a calibrated causal cut-off"):
        modadapt.calibrate_cutoffs(model, [make_ids(1, 8)])


@pytest.mark.parametrize(
    "setup, batches, message",
    [
        (None, [make_ids(1, 8)], "not converted"),
        ({"router": "threshold-p"}, [make_ids(1, 8)], "no MoD layer has a calibrated causal cut-off"),
        ({"router": "topk", "capacity": 1.0}, [make_ids(1, 8)], "no MoD layer has a calibrated causal cut-off"),
        ({"router": "topk", "capacity": 0.25}, [], "no calibration batches"),
    ],
)
def test_bad_input_is_one_clear_error_and_changes_nothing(tiny, setup, batches, message):
    model = tiny("llama")
    if setup is not None:
        modadapt.convert(model, layers="1,2", **setup)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModAdaptError, match=message):
        modadapt.calibrate_cutoffs(model, batches)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_that_attends_both_ways_has_nothing_to_calibrate():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3)
    modadapt.convert(model, router="topk", capacity=0.5, layers="1")
    with pytest.raises(ModAdaptError, match="attends both ways"):
        modadapt.calibrate_cutoffs(model, [torch.randn(1, 3, 32, 32)])


def test_a_failure_part_way_leaves_every_cut_off_as_it_was(tiny, monkeypatch):
    model = _topk_model(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items() if "calibrat" in k}
    calls = []
    original = modadapt.routers.base.Router.set_cutoff

    def failing_second(self, layer_index, value):
        calls.append(layer_index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interrupt after the first layer was set
        original(self, layer_index, value)

    monkeypatch.setattr(modadapt.routers.base.Router, "set_cutoff", failing_second)
    with pytest.raises(KeyboardInterrupt):
        modadapt.calibrate_cutoffs(model, [make_ids(2, 16)])
    after = {k: v for k, v in model.state_dict().items() if "calibrat" in k}
    assert len(calls) == 2 and all(torch.equal(before[k], after[k]) for k in before)


def test_spread_blocks_are_evenly_spaced():
    from modadapt.recipes.lm_adapt import spread_blocks

    blocks = torch.arange(10)[:, None].expand(10, 3)
    assert spread_blocks(blocks, 4)[:, 0].tolist() == [0, 3, 6, 9]  # the first and the last block
    assert spread_blocks(blocks, 10) is blocks and spread_blocks(blocks, 12) is blocks
    assert spread_blocks(blocks, 1)[:, 0].tolist() == [0] and len(spread_blocks(blocks, 0)) == 0


def test_lm_adapt_sets_the_cut_offs_for_inference_and_records_both(tmp_path):
    """The recipe's saved model keeps its capacity under the causal rule on the calibration
    blocks (`calibrate_blocks` training blocks, evenly spaced); the summary has training's cut-offs
    and the new ones; `--calibrate-blocks 0` keeps training's."""
    from conftest import lm_adapt_config

    from modadapt.recipes.lm_adapt import load_blocks, run, spread_blocks
    from modadapt.tokenizer import byte_tokenizer

    words = "fox dog grep make the a lists runs over file dir pattern quick lazy of to".split()
    rng = random.Random(0)  # text that never repeats: a repeated phrase ties the routers' scores
    text = tmp_path / "varied.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(1500)))
    cfg = lm_adapt_config(tmp_path / "a", calibrate_blocks=8, router_kwargs={}, data=str(text))
    summary = run(cfg)
    cutoffs = summary["calibrated_cutoffs"]
    assert set(cutoffs) == {"training", "inference"} and cutoffs["training"].keys() == cutoffs["inference"].keys()
    assert cutoffs["training"] != cutoffs["inference"]
    model = modadapt.load(tmp_path / "a" / "run" / "model")
    for layer in modadapt.mod_layers(model):
        assert float(layer.router.causal_threshold(layer.mod_state.index)) == pytest.approx(
            cutoffs["inference"][str(layer.mod_state.index)]
        )
    train_blocks, _ = load_blocks(cfg, byte_tokenizer(model), model.config.vocab_size)
    spread = spread_blocks(train_blocks, 8)
    assert len(train_blocks) > 8 and torch.equal(spread[-1], train_blocks[-1])  # not the first 8
    kept, routed = _kept_per_layer(model.eval(), spread.split(cfg.eval_batch_size))
    assert all(abs(kept[i] - kept_count(0.25, n)) <= 1 for i, n in routed.items())  # float noise at most

    from modadapt.cli import main  # a run directory is a model for `modadapt calibrate` too

    flags = ["--data", cfg.data, "--seq-len", "32", "--samples", "4", "--quiet"]
    assert main(["calibrate", str(tmp_path / "a" / "run"), *flags, "-o", str(tmp_path / "again")]) == 0
    assert modadapt.mod_layers(modadapt.load(tmp_path / "again"))  # a converted model, written anew

    off = run(lm_adapt_config(tmp_path / "b", calibrate_blocks=0, data=str(text)))
    assert off["calibrated_cutoffs"] is None
    model = modadapt.load(tmp_path / "b" / "run" / "model")
    kept, routed = _kept_per_layer(model.eval(), spread.split(cfg.eval_batch_size))
    assert kept != {i: kept_count(0.25, n) for i, n in routed.items()}


def _saved_topk(tmp_path, router="topk", **config):
    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(model, router=router, layers="1,2,3", **config)
    if router == "topk":
        randomize_router_weights(model, scale=0.5)
    modadapt.save(model, tmp_path / "model")
    return tmp_path / "model"


def test_the_calibrate_command_sets_the_cut_offs_and_saves_anew(tmp_path, capsys):
    from modadapt.cli import main
    from modadapt.metrics.calibration import read_text, text_batches

    source = _saved_topk(tmp_path, capacity=0.25)
    (tmp_path / "text.txt").write_text("Lists are mutable sequences, tuples are not. " * 60)
    args = ["--data", str(tmp_path / "text.txt"), "--samples", "6", "--seq-len", "24", "--batch-size", "4"]
    assert main(["calibrate", str(source), *args, "-o", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("cut-off") == 3 and "saved to" in printed
    model = modadapt.load(tmp_path / "out")
    text, _, _ = read_text(str(tmp_path / "text.txt"))
    batches, _ = text_batches(text, tokenizer=None, vocab_size=256, samples=6, seq_len=24, batch_size=4, seed=0)
    kept, routed = _kept_per_layer(model.eval(), batches)
    assert kept == {i: kept_count(0.25, n) for i, n in routed.items()}
    original = modadapt.load(source)  # the source is left as it was
    assert _kept_per_layer(original.eval(), batches)[0] != kept


def test_the_calibrate_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    from modadapt.cli import main

    (tmp_path / "text.txt").write_text("some text " * 50)
    data = ["--data", str(tmp_path / "text.txt"), "--seq-len", "16", "--samples", "2"]
    threshold = _saved_topk(tmp_path / "t", router="threshold-p")
    cases = [
        ([str(threshold)], "no MoD layer has a calibrated causal cut-off"),
        ([str(tmp_path)], "is not a converted model"),
        ([str(_saved_topk(tmp_path / "k", capacity=0.25)), "--samples", "0"], "--samples must be at least 1"),
        ([str(tmp_path / "k" / "model"), "--device", "nonsense"], "is not a torch device"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["calibrate", *extra[:1], *data, *extra[1:], "-o", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
