"""The quality-at-scale benchmark (`benchmarks/lm_quality_scale.py`) at tiny size on real text:
tokenizer, pretraining, every variant and baseline, seeds, records and table, FLOPs by a direct count."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, randomize_router_weights, threads_restored
from torch.utils.flop_counter import FlopCounterMode

import modadapt


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        module = load_benchmark("lm_quality_scale", patch)
        if not (module.DEFAULT_DATA / "train.txt.gz").is_file():
            pytest.skip("the tech-docs corpus is not on this machine")
        yield module


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    """Two seeds of every variant (the second call appends seed 1 to seed 0's records); each
    run's teacher, as `run` was given it (its layer count, or None), in WORK/teachers.json."""
    work = tmp_path_factory.mktemp("scale")
    teachers, adapt = {}, bench.run

    def recording(cfg, *args, teacher=None, **kwargs):
        teachers[Path(cfg.output).name] = None if teacher is None else teacher.config.num_hidden_layers
        return adapt(cfg, *args, teacher=teacher, **kwargs)

    with threads_restored(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "run", recording)
        first = bench.main(["--tiny", "--work", str(work), "--seeds", "0"])
        both = bench.main(["--tiny", "--work", str(work), "--seeds", "0,1", "--append"])
    (work / "teachers.json").write_text(json.dumps(teachers))
    return work, first, both


def test_chunked_encoding_equals_one_call(bench, tmp_path, monkeypatch):
    """Long text is encoded in parallel chunks cut inside blank lines: the ids equal one call's."""
    from modadapt.recipes import lm_adapt

    text = bench.read_split(bench.DEFAULT_DATA, "valid", 200_000)
    tokenizer = bench.train_tokenizer(text, 400, tmp_path / "tok")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(lm_adapt, "CHUNK_CHARS", 5_000)
    cuts = lm_adapt.chunk_boundaries(text, 5_000)
    assert len(cuts) > 20 and cuts[0] == 0 and cuts[-1] == len(text)
    assert all(text[c - 1] == "\n" and text[c] == "\n" and not text[c + 1].isspace() for c in cuts[1:-1])
    assert lm_adapt.chunk_boundaries(text) == cuts  # the chunk size tokenize() uses
    assert lm_adapt.byte_level_without_prefix(tokenizer.backend_tokenizer)  # so tokenize() chunks
    assert lm_adapt.tokenize(text, tokenizer, 400) == whole
    # a tokenizer that marks where text starts is never chunked
    assert not lm_adapt.byte_level_without_prefix(None)


def test_tokenizer_is_a_transformers_tokenizer_beside_the_model(bench, tiny_run):
    from modadapt.metrics.calibration import model_tokenizer

    work, _, _ = tiny_run
    tokenizer = model_tokenizer(str(work / "pretrained"))  # what eval, analyze and lm-adapt load
    assert tokenizer is not None and tokenizer.eos_token == bench.EOS and len(tokenizer) == bench.TINY.vocab
    text = "Set the option with :set tabstop=4 in vim."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    again = bench.train_tokenizer(
        bench.read_split(bench.DEFAULT_DATA, "train", bench.TINY.text_chars), bench.TINY.vocab, work / "tok-again"
    )
    assert (work / "tok-again" / "tokenizer.json").read_text() == (work / "tokenizer" / "tokenizer.json").read_text()
    assert again.vocab_size == tokenizer.vocab_size


def by_budget(records, budget):
    return {r["variant"] for r in records if r.get("budget") == budget}


def test_every_variant_and_seed_is_recorded(bench, tiny_run):
    work, first, both = tiny_run
    assert json.loads((work / "lm_quality_scale.json").read_text()) == both
    planned, notes = bench.plan(
        bench.build_dense(bench.TINY, 0),
        bench.TINY,
        json.loads((work / "layer_scores.json").read_text()),
        list(bench.VARIANTS),
        [0, 1],
    )
    assert sorted(bench.task_id(t) for t in planned) == sorted(bench.task_id(r) for r in both[1:])
    assert {bench.task_id(r) for r in first} <= {bench.task_id(r) for r in both}  # seed 0 kept, not rerun
    assert {r["seed"] for r in both[1:]} == {0, 1} and both[0]["variant"] == "dense"
    routers = {r["router"] for r in both}
    assert {
        "topk",
        "threshold-p",
        "attention",
        "random",
        "dense",
        "dense-adapt",
        "layer-drop-even",
        "layer-drop-cosine",
        "layer-drop-arank",
    } <= routers
    for r in both:
        assert {
            "variant",
            "router",
            "placement",
            "seed",
            "params",
            "layers",
            "flops_ratio",
            "valid_ppl",
            "ood_ppl",
            "kept_fraction",
            "adapt_tokens",
            "agreement",
            "command",
        } <= set(r)
        assert r["valid_ppl"] > 1 and r["ood_ppl"] > 1 and 0 < r["flops_ratio"] <= 1.001 and 0 <= r["agreement"] <= 1
    adapted = [r for r in both if r["variant"] != "dense"]
    # every run is its variant's row: calibrated routers record the cut-off rule they learnt
    assert all(bench.row_label(r) == r["variant"] for r in adapted)
    assert {r["router"] for r in adapted if "cutoff_rule" in r} == {"topk", "attention"}
    for r in adapted:  # their cut-offs are set for inference after training, and training's are measured too
        if "cutoff_rule" in r:
            assert r["cutoff_rule"] == bench.CUTOFF_RULE == "spread"
            layers = r["cutoffs"]["training"].keys()  # a layer given capacity 1 has no cut-off to set
            assert layers == r["cutoffs"]["inference"].keys() and set() < layers <= set(map(str, r["routed_layers"]))
            assert r["valid_ppl_training_cutoff"] > 1 and 0 < r["flops_ratio_training_cutoff"] <= 1.001
        else:
            assert "cutoffs" not in r and "valid_ppl_training_cutoff" not in r
    assert not any(bench.calibrated(name) for name in ("threshold-p", "random", "dense-adapt", "layer-drop-even"))
    for r in adapted:  # the shared budget, or its multiple in the budget ablation
        steps = bench.TINY.adapt_steps * bench.VARIANTS[r["variant"]].budget
        assert r["adapt_tokens"] == steps * bench.TINY.adapt_batch * bench.TINY.seq_len and r["adapt_steps"] == steps
    assert by_budget(adapted, 2) == {
        "topk-distill-2x",
        "threshold-p-all-distill-2x",
        "layer-drop-even-2x",
        "topk-distill-even+1-2x",
    }
    levels = bench.levels(bench.build_dense(bench.TINY, 0), bench.TINY.seq_len)
    for r in adapted:
        if r["router"] == bench.ATTENTION_DROP:  # attention sublayers deleted, every layer kept
            assert len(r["dropped_layers"]) == levels[r["level"]]["attention_drop"] and r["layers"] == 6
            assert abs(r["flops_ratio"] - levels[r["level"]]["flops_ratio"]) <= bench.MATCHED
        elif r["router"] in bench.STATIC:
            assert len(r["dropped_layers"]) == levels[r["level"]]["drop"] and r["layers"] == 6 - len(
                r["dropped_layers"]
            )
    for r in (r for r in adapted if bench.VARIANTS[r["variant"]].spare):  # hybrids: deletion, then routing
        deleted = r["deleted_layers"]
        assert deleted == bench.evenly_spaced(levels[r["level"]]["drop"] - 2, 6) and r["layers"] == 6 - len(deleted)
        assert r["placement"].startswith(f"delete {','.join(map(str, deleted))}, then even+")
        assert max(r["routed_layers"]) < r["layers"] and r["flops_ratio"] <= r["target_flops_ratio"] + 0.01
        assert r["flops_ratio"] < bench.drop_ratio(bench.build_dense(bench.TINY, 0), deleted, bench.TINY.seq_len)
    ids = {bench.task_id(r) for r in both}  # at 0.70 the tiny model's deletion removes 2 layers: sparing both, none
    assert (
        "hybrid2-topk-distill-even+1~spread~dense-teacher@0.55#s0" in ids
        and "hybrid2-topk-distill-even+1~spread~dense-teacher@0.70#s0" not in ids
    )
    scoped = [r for r in adapted if r["variant"] == "topk-distill-attention-even+1"]
    assert scoped and all(
        r["scope"] == "attention" and r["flops_ratio"] <= r["target_flops_ratio"] + 0.01 for r in scoped
    )
    assert len(scoped[0]["routed_layers"]) == levels[scoped[0]["level"]]["attention_drop"] + 1
    by = {f"{bench.row_label(r)}@{r['level']}#s{r['seed']}": r for r in both}
    assert by["topk-warmup@0.70#s0"]["recipe_options"] == {"capacity_warmup": 1}  # half of 2 steps
    assert by["topk-routers-first@0.70#s0"]["recipe_options"] == {"router_steps": 1}
    assert by["topk-distill@0.70#s0"]["recipe_options"] == {"distill": 1.0}
    assert by["topk-tanh@0.70#s0"]["router_kwargs"] == {"gate": "tanh"}
    assert by["topk-distill-fit@0.70#s0"]["recipe_options"] == {"distill": 1.0, "router_init": "update-size"}
    assert by["topk-router-lr10@0.70#s0"]["recipe_options"] == {"router_lr_scale": 10.0}
    for level, spec in levels.items():  # soft deletion: one more evenly spaced layer than deletion removes
        assert by[f"topk-even+1@{level}#s0"]["routed_layers"] == bench.evenly_spaced(spec["drop"] + 1, 6)
    assert "topk-distill-even+2@0.55#s0" in by and "topk-distill-even+2@0.70#s0" not in by  # 0.70: every other
    capacities = by["topk-all-capacities-cosine@0.55#s0"]["capacities"]
    assert len(set(capacities.values())) > 1 and by["topk-all@0.55#s0"].get("capacities") is None
    table = (work / "lm_quality_scale.md").read_text()
    assert "## FLOPs level 0.70" in table and "## FLOPs level 0.55" in table and "## Goals" in table
    assert "| layer-drop-cosine | layer-drop-cosine |" in table and "| 2 |" in table  # two seeds aggregated
    assert "no NaN or divergence" in table


def test_bad_arguments_are_one_clear_error(bench, capsys, tmp_path):
    with pytest.raises(SystemExit):  # the appended runs would start from another model
        bench.parse_args(["--new-pretrained", "--append"])
    assert "write its runs to a new --out" in capsys.readouterr().err
    for option in ("--variants", "--keep-models"):  # refused before any data or model is built
        with pytest.raises(SystemExit, match=f"{option}: unknown variants \\['nope'\\]"):
            bench.main(["--tiny", "--work", str(tmp_path / "fresh"), option, "topk,nope"])
    assert not (tmp_path / "fresh").exists()


def test_attention_deletion_adds_nothing_from_the_deleted_sublayers(bench):
    """`remove_attention`: the same logits as the model whose deleted layers' attention output
    projection is zero (the sublayer then adds nothing to the residual), and the dense model is
    left as it was."""
    from layer_drop import remove_attention

    dense = bench.build_dense(bench.TINY, 0).eval()
    ids = torch.randint(0, bench.TINY.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    before = dense(ids).logits
    cut = remove_attention(dense, [1, 3])
    zeroed = copy.deepcopy(dense)
    for i in (1, 3):
        zeroed.model.layers[i].self_attn.o_proj.weight.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, zeroed(ids).logits)
        torch.testing.assert_close(dense(ids).logits, before)
        assert not torch.allclose(cut(ids).logits, before)


def test_core_names_the_issues_comparison(bench):
    args = bench.parse_args(["--variants", "topk-fit,core,topk"])
    names = args.variants.split(",")
    assert names[0] == "topk-fit" and names[1:] == list(bench.CORE)  # expanded in place, each once
    assert set(bench.CORE) <= set(bench.VARIANTS)


def test_static_baselines_drop_the_layers_their_metric_ranks(bench, tiny_run):
    work, _, both = tiny_run
    scores = json.loads((work / "layer_scores.json").read_text())
    for r in both:
        if r["router"] == "layer-drop-cosine":  # ShortGPT: the most similar input and output
            count = len(r["dropped_layers"])
            assert r["dropped_layers"] == sorted(sorted(range(1, 6), key=lambda i: -scores["cosine"][i])[:count])
        if r["router"] == "layer-drop-arank":
            count = len(r["dropped_layers"])
            assert r["dropped_layers"] == sorted(sorted(range(1, 6), key=lambda i: scores["arank"][i])[:count])
        if r["router"] == "layer-drop-even":
            assert r["dropped_layers"] == bench.evenly_spaced(len(r["dropped_layers"]), 6)
    assert bench.evenly_spaced(6, 12) == [1, 3, 5, 7, 9, 11] and bench.evenly_spaced(4, 12) == [2, 5, 7, 10]


def test_a_deleted_model_distills_from_the_dense_one(bench, tiny_run):
    """A run that deletes layers and distills (a deletion's distillation ablation, a hybrid) is given
    the dense model as its teacher and records it; no other run is given one (a routed copy of the
    dense model distills from its starting weights, the dense model, by default). Such a record
    without a teacher, made before, gets a row of its own."""
    work, _, both = tiny_run
    teachers = json.loads((work / "teachers.json").read_text())
    runs = {bench.task_id(r).replace("@", "_").replace("#", "_"): r for r in both[1:]}
    assert set(teachers) == set(runs)
    distilled = set()
    for name, record in runs.items():
        if bench.VARIANTS[record["variant"]].deletes_then_distills:
            distilled.add(record["variant"])
            assert teachers[name] == bench.TINY.layers and record["teacher"] == bench.DENSE_TEACHER, name
            assert record["layers"] < bench.TINY.layers and "deleted-teacher" not in bench.row_label(record)
            earlier = {k: v for k, v in record.items() if k != "teacher"}
            assert bench.row_label(earlier) == bench.row_label(record) + "~deleted-teacher"
        else:
            assert teachers[name] is None and "teacher" not in record, name
    assert {"layer-drop-even-distill", "layer-drop-cosine-distill", "hybrid2-topk-distill-even+1"} <= distilled


def counted_flops(model, tokens: torch.Tensor) -> int:
    """FLOPs of one forward as torch's flop counter sees them (eager attention: it counts SDPA as 0)."""
    model = copy.deepcopy(model).eval()
    model.config._attn_implementation = "eager"
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=tokens, use_cache=False)
    return counter.get_total_flops()


def test_flops_ratios_agree_with_a_direct_count(bench):
    dense = bench.build_dense(bench.TINY, 0)
    T = bench.TINY.seq_len
    tokens = torch.randint(0, bench.TINY.vocab, (2, T))
    full = counted_flops(dense, tokens)
    for drop in ([2, 4], [1, 3, 5]):
        dropped = bench.remove_layers(dense, drop)
        assert bench.drop_ratio(dense, drop, T) == pytest.approx(counted_flops(dropped, tokens) / full, rel=1e-9)
    routed = [1, 3, 5]
    capacity = bench.solve_capacity(dense, routed, 0.7, T)
    converted = modadapt.convert(
        copy.deepcopy(dense), router="topk", capacity=capacity, layers=routed, inference_routing="topk"
    )
    formula = bench.sequence_flops(bench.dense_table(dense, routed), T, {i: round(capacity * T) for i in routed})
    assert formula / bench.sequence_flops(bench.flops_table(dense), T) <= 0.7
    assert formula * 2 == pytest.approx(counted_flops(converted, tokens), rel=1e-9)
    # one more kept token would exceed the target; a level no placement reaches is refused
    bigger = bench.sequence_flops(bench.dense_table(dense, routed), T, {i: round(capacity * T) + 1 for i in routed})
    assert bigger / bench.sequence_flops(bench.flops_table(dense), T) > 0.7
    assert bench.solve_capacity(dense, routed, 0.3, T) is None
    # per-layer capacities in proportion to need, the same count
    need = [0.1, 0.3, 0.2]
    capacities = bench.solve_capacities(dense, routed, need, 0.7, T)
    assert capacities[1] < capacities[5] < capacities[3]
    for i, layer in zip(routed, modadapt.mod_layers(converted)):
        layer.router.target_share = capacities[i]
    kept = {i: round(c * T) for i, c in capacities.items()}
    formula = bench.sequence_flops(bench.dense_table(dense, routed), T, kept)
    assert formula / bench.sequence_flops(bench.flops_table(dense), T) <= 0.7
    assert formula * 2 == pytest.approx(counted_flops(converted, tokens), rel=1e-9)
    assert bench.solve_capacities(dense, routed, need, 0.3, T) is None
    # a hybrid: the level's FLOPs counted on the model deletion left, relative to the whole model;
    # placements and capacities by layer scores would index the whole model, so a hybrid takes neither
    for bad in ({"placement": "cosine"}, {"placement": "even+1", "capacities": "arank"}):
        with pytest.raises(ValueError, match="hybrid"):
            bench.Variant("topk", spare=2, **bad)
    task = next(
        t for t in bench.plan(dense, bench.TINY, {}, ["hybrid2-topk-distill-even+2"], [0])[0] if t["level"] == "0.55"
    )
    host = bench.remove_layers(dense, task["deleted_layers"])
    hybrid = modadapt.convert(
        host, router="topk", capacity=task["capacity"], layers=task["routed_layers"], inference_routing="topk"
    )
    counted = counted_flops(hybrid, tokens) / full
    assert counted <= task["target_flops_ratio"] + 1e-9
    assert counted == pytest.approx(
        bench.sequence_flops(
            bench.dense_table(host, task["routed_layers"]),
            T,
            {i: round(task["capacity"] * T) for i in task["routed_layers"]},
        )
        * 2
        / full,
        rel=1e-9,
    )


def test_goals_are_judged_from_means_and_spreads(bench):
    def rec(variant, level, seed, router, valid, ood, flops, placement="every-other"):
        return dict(
            variant=variant,
            level=level,
            seed=seed,
            router=router,
            placement=placement,
            valid_ppl=valid,
            ood_ppl=ood,
            flops_ratio=flops,
            kept_fraction=0.5,
            agreement=0.9,
            skipped_steps=0,
            train_loss_start=3.0,
            train_loss_end=2.0,
            cutoff_rule=bench.CUTOFF_RULE,
        )

    records = [rec("dense", "1.00", 0, "dense", 7.0, 20.0, 1.0)]
    records += [rec("dense-adapt", "1.00", s, "dense-adapt", 7.0 + 0.01 * s, 20.0, 1.0) for s in range(3)]
    records += [rec("topk", "0.70", s, "topk", 7.1 + 0.01 * s, 21.0 + 0.1 * s, 0.68) for s in range(3)]
    records += [rec("random", "0.70", s, "random", 7.5, 22.0, 0.69) for s in range(3)]
    records += [
        rec("layer-drop-even", "0.70", s, "layer-drop-even", 7.3 + 0.1 * s, 21.0 + 0.1 * s, 0.686, "2,5")
        for s in range(3)
    ]
    judged = {goal: (measured, met) for goal, measured, met in bench.goals(records)}
    # valid: 7.11 + 0.1 (the larger std) < 7.4; ood: 21.1 vs 21.1, not beaten
    assert judged["FLOPs 0.70: best learned router beats best static baseline on valid ppl by > max std"][1]
    assert not judged["FLOPs 0.70: best learned router beats best static baseline on ood ppl by > max std"][1]
    assert judged["topk beats random at FLOPs 0.70"][1]
    assert judged["no NaN or divergence"][1]
    # a longer adaptation (the budget ablation) never enters the equal-budget comparisons
    longer = [dict(rec("topk-distill-2x", "0.70", s, "topk", 6.0, 15.0, 0.68), budget=2) for s in range(3)]
    compared = lambda rs: {g: m for g, m, _ in bench.goals(rs) if g != "no NaN or divergence"}  # noqa: E731
    assert compared(records + longer) == compared(records)
    assert "all 15 runs finite" in {g: m for g, m, _ in bench.goals(records + longer)}["no NaN or divergence"]
    diverged = lambda rs: not {g: ok for g, _, ok in bench.goals(rs)}["no NaN or divergence"]  # noqa: E731
    hard_batches = copy.deepcopy(records)  # seed 0's last batches are harder: every run's loss rises
    for r in hard_batches:
        if r["seed"] == 0 and r["variant"] != "dense":
            r["train_loss_end"] = r["train_loss_start"] + 0.3 if r["variant"] == "dense-adapt" else 3.35
    assert not diverged(hard_batches)
    hard_batches[4]["train_loss_end"] = 3.45  # 0.15 nats more than dense-adapt's rise on the same batches
    assert diverged(hard_batches)
    records[1]["valid_ppl_before"] = 7.0
    assert not diverged(records)
    records[1]["valid_ppl"] = 7.4  # dense-adapt ends 5.7% above the pretrained model
    assert diverged(records)
    records[1]["valid_ppl"] = 7.0
    records[4]["train_loss_end"] = 3.5  # a rising loss is divergence
    assert diverged(records)
    # runs made with the earlier causal cut-off rule form rows of their own, never averaged with new seeds
    earlier = [{k: v for k, v in dict(r, valid_ppl=9.0).items() if k != "cutoff_rule"} for r in records[4:7]]
    table = bench.aggregate(records[:7] + earlier)
    assert table[("0.70", "topk")]["valid_ppl"][0] == pytest.approx(7.11)
    assert table[("0.70", "topk~row-mean")]["valid_ppl"] == (9.0, 0.0)
    assert table[("0.70", "topk~row-mean")]["seeds"] == 3
    pooled = [dict(r, valid_ppl=8.0, cutoff_rule="pooled") for r in records[4:7]]  # a named earlier rule
    table = bench.aggregate(records[:7] + earlier + pooled)
    assert table[("0.70", "topk~pooled")]["valid_ppl"] == (8.0, 0.0)
    assert table[("0.70", "topk")]["valid_ppl"][0] == pytest.approx(7.11)
    # ... and their run names differ, so a reused WORK never takes an earlier rule's record for a new run
    assert bench.task_id(earlier[0]) == "topk@0.70#s0" and bench.task_id(pooled[0]) == "topk~pooled@0.70#s0"
    assert bench.task_id(records[4]) == f"topk~{bench.CUTOFF_RULE}@0.70#s0" != bench.task_id(pooled[0])
    assert bench.row_label(records[1]) == "dense-adapt"  # no routers, no cut-off: one row whatever the date


def test_a_reused_work_folder_keeps_earlier_rule_runs_apart_from_new_ones(bench, tmp_path):
    """An earlier cut-off rule's record in WORK (named as it was made) does not stand for the new
    rule's run of the same variant, level and seed: that run is still to do, under its own name."""
    earlier = {"variant": "topk", "level": "0.70", "seed": 0, "router": "topk"}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / f"{bench.task_id(earlier)}.json").write_text(json.dumps(earlier))
    new = dict(earlier, cutoff_rule=bench.CUTOFF_RULE)
    assert bench.unfinished(tmp_path, [earlier, new]) == [bench.task_id(new)]
    assert bench.row_label(earlier) == "topk~row-mean" and bench.row_label(new) == "topk"


def test_a_run_out_of_device_memory_is_given_back_and_run_by_another_worker(bench, tmp_path, monkeypatch, capsys):
    tasks = [{"variant": "topk", "level": "0.70", "seed": s} for s in (0, 1, 2)]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"tasks": tasks, "deadline": 0, "command": "c"}))
    calls = []

    def fake_run(task, ctx):
        calls.append(bench.task_id(task))
        if task["seed"] == 1 and ctx["name"] == "first":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {
            **task,
            "valid_ppl": 1.0,
            "ood_ppl": 1.0,
            "flops_ratio": 1.0,
            "kept_fraction": 1.0,
            "agreement": 1.0,
            "wall_s": 0.0,
        }

    monkeypatch.setattr(bench, "run_task", fake_run)
    bench.work_through({"work": tmp_path, "name": "first"}, plan_file)  # runs s0, gives s1 back, stops
    assert calls == ["topk@0.70#s0", "topk@0.70#s1"]
    assert "given back" in capsys.readouterr().out
    bench.work_through({"work": tmp_path, "name": "second"}, plan_file)  # takes s1 up, then s2
    assert calls[2:] == ["topk@0.70#s1", "topk@0.70#s2"]
    assert sorted(p.stem for p in (tmp_path / "records").glob("*.json")) == [bench.task_id(t) for t in tasks]


def test_runs_left_undone_by_the_deadline_are_named(bench, tmp_path, monkeypatch):
    tasks = [{"variant": "topk", "level": "0.70", "seed": s} for s in (0, 1)]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"tasks": tasks, "deadline": 1.0, "command": "c"}))  # long past
    monkeypatch.setattr(bench, "run_task", lambda task, ctx: pytest.fail("a run started after the deadline"))
    bench.work_through({"work": tmp_path}, plan_file)
    assert bench.unfinished(tmp_path, tasks) == ["topk@0.70#s0", "topk@0.70#s1"]
    (tmp_path / "records" / "topk@0.70#s0.json").write_text("{}")
    assert bench.unfinished(tmp_path, tasks) == ["topk@0.70#s1"]


def test_runs_pin_the_recipe_they_were_measured_with(bench, tiny_run):
    """lm-adapt's defaults became the best setting found (distillation on); every run still sets
    the recipe the records were measured with, and a variant changes only what it names."""
    import yaml

    work, _, both = tiny_run
    for record in both[1:]:
        run_dir = work / "runs" / bench.task_id(record).replace("@", "_").replace("#", "_")
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["distill"] == record["recipe_options"].get("distill", 0.0), bench.task_id(record)


def test_the_training_cut_offs_are_measured_on_the_same_model_and_given_back(bench):
    """`at_training_cutoffs`: with the model's own cut-offs it is the plain evaluation; with
    others it measures them and leaves the model's as they were."""
    model = modadapt.build_preset("tiny-llama")
    randomize_router_weights(modadapt.convert(model, router="topk", capacity=0.25, layers="1,2,3"))
    blocks = torch.randint(1, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    found = modadapt.calibrate_cutoffs(model, [blocks])
    device = torch.device("cpu")
    plain = bench.evaluate(model, blocks, batch_size=2)
    same = bench.at_training_cutoffs(model, blocks, 2, device, {"training": {str(i): c for i, c in found.items()}})
    assert (
        same["valid_ppl_training_cutoff"] == plain["ppl"]
        and same["flops_ratio_training_cutoff"] == plain["flops_ratio"]
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lower = bench.at_training_cutoffs(
        model, blocks, 2, device, {"training": {str(i): c - 1.0 for i, c in found.items()}}
    )
    assert lower["kept_fraction_training_cutoff"] > same["kept_fraction_training_cutoff"]
    assert lower["flops_ratio_training_cutoff"] > same["flops_ratio_training_cutoff"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_call_on_some_variants_keeps_the_earlier_notes(bench):
    records = [{"variant": "dense", "notes": ["a cannot run", "b cannot run"]}, {"variant": "topk"}]
    assert bench.merged_notes(records, ["b cannot run", "c cannot run"]) == [
        "a cannot run",
        "b cannot run",
        "c cannot run",
    ]
    assert bench.merged_notes([{"variant": "topk"}], ["c cannot run"]) == ["c cannot run"]
