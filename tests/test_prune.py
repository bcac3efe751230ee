"""`modadapt prune`: deleting layers equals skipping them, in every family; the saved model loads
without modadapt and decodes with its cache; `lm-adapt --router none` heals it from the original."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import build_tiny, lm_adapt_config

import modadapt
from modadapt.cli import main
from modadapt.metrics.layer_stack import find_layers
from modadapt.prune import PRUNE_FILE, evenly_for_flops, flops_ratio, prune, save_pruned
from modadapt.recipes.lm_adapt import run

pytestmark = pytest.mark.usefixtures("one_thread")


def skipping(model, layers):
    """`model` with forward hooks that make each layer in `layers` return its input unchanged."""
    handles = []
    for index in layers:

        def identity(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(find_layers(model)[index].register_forward_hook(identity, with_kwargs=True))
    return handles


def test_pruning_equals_skipping_the_layers_and_reloads_without_modadapt(family, tmp_path):
    model = build_tiny(family)
    original = copy.deepcopy(model)
    deleted = prune(model, "evenly:2")
    assert deleted == [1, 3] and len(find_layers(model)) == 2
    assert model.config.num_hidden_layers == 2
    for new, layer in enumerate(find_layers(model)):  # the KV cache is indexed by the new positions
        assert {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)} <= {new}
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    skipping(original, deleted)
    with torch.no_grad():
        want = original(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    save_pruned(model, tmp_path / "pruned", {"deleted_layers": deleted})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_pruned_model_decodes_with_its_cache(core_family):
    model = build_tiny(core_family)
    prune(model, [2])
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=out.sequences).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "layers, message",
    [
        ("0,2", "layer 0 always stays"),
        ("evenly:4", "evenly:4 would delete 4 of 4 layers"),
        ("7", "out of range"),
        ("1,1", "more than once"),
        ("many", "is not a layer list"),
    ],
)
def test_bad_layers_are_refused(layers, message):
    model = build_tiny("llama")
    with pytest.raises(modadapt.ModAdaptError, match=message):
        prune(model, layers)
    assert len(find_layers(model)) == 4  # untouched


def test_a_converted_model_is_refused():
    model = modadapt.convert(build_tiny("llama"), router="topk", capacity=0.5)
    with pytest.raises(modadapt.ModAdaptError, match="prune its dense original"):
        prune(model, [1])


def test_flops_ratio_counts_the_deleted_layers():
    model = build_tiny("llama")  # four equal layers and a head: deleting two removes half the layers' FLOPs
    half = flops_ratio(model, [1, 3], 64)
    assert 0.5 < half < flops_ratio(model, [1], 64) < 1.0
    assert flops_ratio(model, [], 64) == 1.0


def test_a_flops_target_picks_the_nearest_evenly_spaced_deletion(tmp_path, capsys):
    model = build_tiny("llama")  # 4 layers: deleting 1, 2 or 3 of them
    deletions = {1: [2], 2: [1, 3], 3: [1, 2, 3]}  # evenly:N of layers 1..3
    ratios = {n: flops_ratio(model, layers, 256) for n, layers in deletions.items()}
    for target in (0.3, 0.5, 0.75, 0.99):
        nearest = min(ratios, key=lambda n: abs(ratios[n] - target))
        assert evenly_for_flops(model, target) == f"evenly:{nearest}"
    for bad in (0, 1.0, 1.5, -0.2, True):
        with pytest.raises(modadapt.ModAdaptError, match="share between 0 and 1"):
            evenly_for_flops(model, bad)
    out = tmp_path / "pruned"
    assert main(["prune", "tiny-llama", "-o", str(out), "--flops", "0.5"]) == 0
    record = json.loads((out / PRUNE_FILE).read_text())
    assert (record["layers"], record["deleted_layers"], record["flops_target"]) == ("evenly:2", [1, 3], 0.5)
    capsys.readouterr()
    assert main(["prune", "tiny-llama", "-o", str(tmp_path / "bad"), "--flops", "2"]) == 2
    assert "share between 0 and 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # one way to name the layers
        main(["prune", "tiny-llama", "-o", str(tmp_path / "bad"), "--flops", "0.5", "--layers", "1"])
    assert not (tmp_path / "bad").exists()


def test_prune_command_writes_the_model_and_its_record_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "tiny-llama", "-o", str(out), "--layers", "evenly:2"]) == 0
    printed = capsys.readouterr().out
    assert "deleted layers [1, 3]" in printed and "--router none --train all --teacher tiny-llama" in printed
    record = json.loads((out / PRUNE_FILE).read_text())
    assert record["deleted_layers"] == [1, 3] and record["kept_layers"] == [0, 2]
    assert record["num_layers"] == {"before": 4, "after": 2}
    assert record["flops_ratio"] == pytest.approx(flops_ratio(build_tiny("llama"), [1, 3], 256))
    assert (out / "tokenizer.json").is_file()  # the byte-level preset's tokenizer goes with it
    assert len(transformers.AutoModelForCausalLM.from_pretrained(str(out)).model.layers) == 2

    assert main(["prune", "tiny-llama", "-o", str(out), "--layers", "1"]) == 2  # exists
    assert main(["prune", "tiny-llama", "-o", str(out), "--layers", "1", "--overwrite"]) == 0
    assert json.loads((out / PRUNE_FILE).read_text())["deleted_layers"] == [1]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["prune", "tiny-llama", "-o", str(bad), "--layers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 0 always stays" in err
    assert not bad.exists()  # nothing half-written
    assert main(["prune", "tiny-vit", "-o", str(bad), "--layers", "1"]) == 2
    assert "causal language models" in capsys.readouterr().err and not bad.exists()


def test_router_none_heals_a_pruned_model_from_the_original(tmp_path, capsys):
    original = tmp_path / "original"
    build_tiny("llama").save_pretrained(str(original))
    pruned = tmp_path / "pruned"
    assert main(["prune", str(original), "-o", str(pruned), "--layers", "evenly:2"]) == 0
    cfg = lm_adapt_config(
        tmp_path, model=str(pruned), router="none", train="all", teacher=str(original), distill=1.0, max_steps=8
    )
    summary = run(cfg)
    assert summary["mod_config"] is None and summary["kept_fraction"]["after"] == {}
    assert summary["prune"]["deleted_layers"] == [1, 3]
    assert all(d > 0 for d in summary["history"]["distill_loss"])  # it distilled from the original
    assert summary["valid_ppl"]["converted_after"] < summary["valid_ppl"]["converted_before"]
    saved = tmp_path / "run" / "model"
    assert not (saved / "modadapt.json").exists() and (saved / PRUNE_FILE).is_file()
    healed = transformers.AutoModelForCausalLM.from_pretrained(str(saved))  # a plain transformers model
    assert healed.config.num_hidden_layers == 2
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "train.txt"), "--max-tokens", "2000"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dense perplexity") and "pruned: layers [1, 3]" in printed


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"train": "routers"}, "no routers to train"),
        ({"capacity_warmup": 2}, "capacity_warmup has no router"),
        ({"router_steps": 2}, "router_steps has no router"),
        ({"router_init": "update-size"}, "router_init has no router"),
    ],
)
def test_router_none_refuses_router_settings(tmp_path, setting, message):
    with pytest.raises(modadapt.ModAdaptError, match=message):
        lm_adapt_config(tmp_path, router="none", **{"train": "all", **setting})
    assert not (tmp_path / "run").exists()
