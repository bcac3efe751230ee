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
from modadapt.prune import PRUNE_FILE, evenly_for_flops, flops_ratio, prune, prune_with_record, save_pruned
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
    model.config.output_router_logits = False  # transformers 5.17's Mixtral fails its aux loss in cached decoding
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
    for both in ({"layers": "1", "flops": 0.5}, {}):
        with pytest.raises(modadapt.ModAdaptError, match="one of them"):
            prune_with_record(model, source="tiny-llama", **both)
    assert len(find_layers(model)) == 4
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
    assert (
        "pruned layers [1, 3] of tiny-llama deleted: 0.528 of its FLOPs per token" in printed
        and "--router none --train all --teacher tiny-llama" in printed
    )
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
        tmp_path,
        model=str(pruned),
        router="none",
        capacity=0.125,  # the default: router none takes no routing settings
        train="all",
        teacher=str(original),
        distill=1.0,
        max_steps=8,
    )
    summary = run(cfg)
    assert summary["mod_config"] is None and summary["kept_fraction"]["after"] == {}
    assert summary["prune"]["deleted_layers"] == [1, 3]
    assert all(d > 0 for d in summary["history"]["distill_loss"])  # it distilled from the original
    assert summary["valid_ppl"]["converted_after"] < summary["valid_ppl"]["converted_before"]
    saved = tmp_path / "run" / "model"
    # a plain transformers model; the record stays with the pruned model (it marks prune's own output)
    assert not (saved / "modadapt.json").exists() and not (saved / PRUNE_FILE).exists()
    healed = transformers.AutoModelForCausalLM.from_pretrained(str(saved))
    assert healed.config.num_hidden_layers == 2
    capsys.readouterr()
    text = str(tmp_path / "train.txt")
    assert main(["eval", str(tmp_path / "run"), "--data", text, "--seq-len", "32", "--json"]) == 0
    healed_ppl = json.loads(capsys.readouterr().out)
    assert main(["eval", str(pruned), "--data", text, "--seq-len", "32", "--json"]) == 0
    pruned_ppl = json.loads(capsys.readouterr().out)
    assert healed_ppl["model"] == pruned_ppl["model"] == "dense" and pruned_ppl["prune"]["deleted_layers"] == [1, 3]
    assert healed_ppl["ppl"] < pruned_ppl["ppl"]  # the same text: healing helped
    assert main(["eval", str(pruned), "--data", text, "--max-tokens", "2000"]) == 0
    assert "pruned: layers [1, 3] of" in capsys.readouterr().out


def test_router_none_refuses_a_converted_model_and_a_preset_teacher_of_another_seed(tmp_path):
    converted = tmp_path / "converted"
    assert main(["convert", "tiny-llama", "--router", "topk", "-o", str(converted)]) == 0
    with pytest.raises(modadapt.ModAdaptError, match="this one is converted"):
        run(lm_adapt_config(tmp_path, model=str(converted), router="none", capacity=0.125))
    pruned = tmp_path / "pruned"
    assert main(["prune", "tiny-llama", "-o", str(pruned), "--layers", "2"]) == 0
    assert json.loads((pruned / PRUNE_FILE).read_text())["seed"] == 0
    cfg = lm_adapt_config(
        tmp_path, model=str(pruned), router="none", capacity=0.125, teacher="tiny-llama", distill=1.0, seed=1
    )
    with pytest.raises(modadapt.ModAdaptError, match="pass --seed 0"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_what_prune_cannot_rebuild_is_refused_before_anything_changes():
    config = transformers.GPT2Config(
        vocab_size=256, n_embd=32, n_layer=4, n_head=2, n_positions=64, scale_attn_by_inverse_layer_idx=True
    )
    model = transformers.GPT2LMHeadModel(config).eval()  # each layer scales its attention by 1 / its index
    with pytest.raises(modadapt.ModAdaptError, match="scaling"):
        prune(model, [1])
    assert len(model.transformer.h) == 4 and model.config.num_hidden_layers == 4


def test_only_per_layer_config_lists_are_shortened():
    model = build_tiny("llama")  # 4 layers, and a list of 4 eos ids that is no per-layer field
    model.config.eos_token_id = [2, 3, 4, 5]
    prune(model, [1, 3])
    assert model.config.eos_token_id == [2, 3, 4, 5]


def test_re_pruning_chains_the_records_and_never_overwrites_what_prune_did_not_write(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["prune", "tiny-llama", "-o", str(first), "--layers", "3"]) == 0
    assert main(["prune", str(first), "-o", str(second), "--layers", "2"]) == 0
    assert "--teacher tiny-llama" in capsys.readouterr().out  # the original, not the intermediate model
    record, before = json.loads((second / PRUNE_FILE).read_text()), json.loads((first / PRUNE_FILE).read_text())
    assert record["original"] == "tiny-llama" and record["previous"] == before
    assert record["flops_ratio_of_original"] == pytest.approx(record["flops_ratio"] * before["flops_ratio"])
    assert main(["prune", str(first), "-o", str(first), "--layers", "1", "--overwrite"]) == 2
    assert "-o is MODEL itself" in capsys.readouterr().err
    converted = tmp_path / "converted"
    assert main(["convert", str(first), "--router", "topk", "-o", str(converted)]) == 0
    assert not (converted / PRUNE_FILE).exists()  # so prune --overwrite cannot take a converted model's place
    assert main(["prune", "tiny-llama", "-o", str(converted), "--layers", "1", "--overwrite"]) == 2
    assert "was not written by modadapt" in capsys.readouterr().err and (converted / "modadapt.json").is_file()
    assert main(["prune", str(converted), "-o", str(tmp_path / "x"), "--layers", "1"]) == 2
    assert "is a converted model; prune its original" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"train": "routers"}, "no routers to train"),
        ({"capacity_warmup": 2}, "capacity_warmup has no router"),
        ({"router_steps": 2}, "router_steps has no router"),
        ({"router_init": "update-size"}, "router_init has no router"),
        ({"capacity": 0.3}, "capacity has no router"),
        ({"layers": "evenly:2"}, "layers has no router.*modadapt prune"),
        ({"router_kwargs": {"alpha": 0.1}}, "router_kwargs has no router"),
        ({"scope": "mlp"}, "scope has no router"),
    ],
)
def test_router_none_refuses_router_settings(tmp_path, setting, message):
    with pytest.raises(modadapt.ModAdaptError, match=message):
        lm_adapt_config(tmp_path, router="none", **{"train": "all", "capacity": 0.125, **setting})
    assert not (tmp_path / "run").exists()


def test_prune_deletes_the_layers_an_analyze_report_selected(tmp_path, capsys):
    report = tmp_path / "report"
    argv = ["analyze", "tiny-llama", "-o", str(report), "--metric", "cosine", "--select", "count=2", "--quiet"]
    assert main([*argv, "--samples", "4", "--seq-len", "32", "--batch-size", "4"]) == 0
    selected = json.loads((report / "report.json").read_text())["selected_layers"]
    assert main(["prune", "tiny-llama", "-o", str(tmp_path / "pruned"), "--layers", f"from:{report}"]) == 0
    assert json.loads((tmp_path / "pruned" / PRUNE_FILE).read_text())["deleted_layers"] == selected
