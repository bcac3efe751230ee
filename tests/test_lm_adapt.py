"""The `lm-adapt` recipe, `modadapt eval` and the LM quality benchmark, end to end on CPU."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json

import pytest
import torch
from conftest import SAMPLE_TEXT, load_benchmark, threads_restored
from torch.utils.flop_counter import FlopCounterMode

import modadapt
from modadapt.cli import main
from modadapt.errors import ModAdaptError
from modadapt.mod_layer import state_of
from modadapt.recipes.lm_adapt import LMAdaptConfig, pack, read_corpus, run, tokenize

TEXT = SAMPLE_TEXT


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "train.txt").write_text(TEXT)
    with gzip.open(root / "valid.jsonl.gz", "wt") as handle:  # jsonl + gzip for the validation side
        for line in ("import os\nprint(os.getcwd())\n" * 6, "Lists are mutable sequences. " * 8):
            handle.write(json.dumps({"text": line}) + "\n")
    return root


def config(corpus, out, **extra) -> LMAdaptConfig:
    base = dict(
        data=str(corpus / "train.txt"),
        valid_data=str(corpus / "valid.jsonl.gz"),
        output=str(out),
        seq_len=32,
        batch_size=4,
        max_steps=4,
        lr=1e-2,
        progress=False,
        cpu=True,
        router="topk",
        capacity=0.5,
        max_train_blocks=24,
        distill=0.0,
    )
    return LMAdaptConfig(**{**base, **extra})


@pytest.fixture(scope="module")
def routers_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    return out, run(config(corpus, out))


def test_routers_only_with_resume(corpus, routers_run, tmp_path, monkeypatch, interrupt_at_step):
    out, straight = routers_run
    assert straight["steps"] == 4 and straight["skipped_steps"] == 0 and straight["train"] == "routers"
    # Only router parameters train: everything else equals the dense preset it came from.
    dense = modadapt.build_preset("tiny-llama", seed=0).state_dict()
    loaded = modadapt.load(out / "model")
    adapted = loaded.state_dict()
    routers = [k for k in adapted if ".router." in k]
    assert routers and set(adapted) - set(routers) == set(dense)
    for name in dense:
        torch.testing.assert_close(adapted[name], dense[name], rtol=0, atol=0, msg=name)
    assert all(adapted[k].abs().sum() > 0 for k in routers if k.endswith("weight"))  # zero-initialised, moved
    assert straight["trainable_parameters"] == sum(p.numel() for n, p in loaded.named_parameters() if ".router." in n)
    assert all(adapted[k] > 0 for k in routers if k.endswith("calibration_steps"))  # causal rule calibrated
    assert set(straight["history"]) >= {"loss", "lm_loss", "aux_loss", "kept_fraction"}
    # Throughput: 4 blocks of 32 tokens per step on one process.
    assert straight["processes"] == 1 and 0 < straight["step_time_s"] <= straight["train_time_s"]
    assert straight["tokens_per_s"] == pytest.approx(4 * 32 / straight["step_time_s"])
    assert all(a > 0 for a in straight["history"]["aux_loss"])  # topk's BCE for its causal rule, logged apart
    assert straight["valid_ppl"]["dense"] == pytest.approx(straight["valid_ppl"]["converted_before"])

    # The same run, killed in its 3rd optimizer step, then resumed from the CLI.
    interrupt_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        run(config(corpus, tmp_path / "b", save_every=1))
    monkeypatch.undo()
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    code = main(
        [
            "train",
            "lm-adapt",
            "--data",
            str(corpus / "train.txt"),
            "--valid-data",
            str(corpus / "valid.jsonl.gz"),
            "-o",
            str(tmp_path / "b"),
            "--resume",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--lr",
            "1e-2",
            "--no-progress",
            "--cpu",
            "--router",
            "topk",
            "--capacity",
            "0.5",
            "--max-train-blocks",
            "24",
        ]
    )
    assert code == 0
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert resumed["history"]["loss"] == pytest.approx(straight["history"]["loss"], rel=1e-5)
    assert resumed["valid_ppl"]["converted_after"] == pytest.approx(straight["valid_ppl"]["converted_after"], rel=1e-5)
    b = modadapt.load(tmp_path / "b" / "model").state_dict()
    for name in adapted:
        torch.testing.assert_close(b[name], adapted[name], msg=name)
    assert "resume: true" in (tmp_path / "b" / "config.yaml").read_text()


def direct_count(model, blocks) -> int:
    """FLOPs the torch flop counter sees, one sequence per forward (no filler slots)."""
    total = 0
    for block in blocks:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(input_ids=block[None], use_cache=False)
        total += counter.get_total_flops()
    return total


def test_a_given_teacher_is_what_the_run_distills_from(corpus, tmp_path):
    """`run(cfg, model, teacher=...)`: a model whose layers were deleted distills from the original
    it came from, not from its own (broken) starting weights. A router that keeps every token
    on one layer leaves the student exactly its starting model, so the first step's distillation
    loss is 0 with the default teacher and the student-to-original divergence with the given one."""
    original = modadapt.build_preset("tiny-llama", seed=1)
    options = dict(train="all", distill=1.0, max_steps=1, router="random", capacity=1.0, layers="1", seed=1)
    pruned = copy.deepcopy(original)
    del pruned.model.layers[2]
    pruned.config.num_hidden_layers -= 1
    own = run(config(corpus, tmp_path / "own", **options), model=copy.deepcopy(pruned))
    assert own["history"]["distill_loss"][0] == pytest.approx(0.0, abs=1e-6)
    given = run(config(corpus, tmp_path / "given", **options), model=copy.deepcopy(pruned), teacher=original)
    assert given["history"]["distill_loss"][0] > 1e-3
    assert not any(p.requires_grad for p in original.parameters()) and not original.training
    with pytest.raises(ModAdaptError, match="distill is 0"):
        run(config(corpus, tmp_path / "none", distill=0.0), model=copy.deepcopy(pruned), teacher=original)
    assert not (tmp_path / "none").exists()
    # the `teacher` setting (`--teacher`): a directory or preset, here the preset `original` was built as
    named = run(config(corpus, tmp_path / "named", teacher="tiny-llama", **options), model=copy.deepcopy(pruned))
    assert named["history"]["distill_loss"][0] == pytest.approx(given["history"]["distill_loss"][0], rel=1e-4)
    # a converted teacher teaches with its dense computation: the original's
    routed = modadapt.convert(copy.deepcopy(original), router="topk", capacity=0.25, layers="every-other")
    dense_of = run(config(corpus, tmp_path / "routed", **options), model=copy.deepcopy(pruned), teacher=routed)
    assert dense_of["history"]["distill_loss"][0] == pytest.approx(given["history"]["distill_loss"][0], rel=1e-4)
    student = copy.deepcopy(pruned)
    with pytest.raises(ModAdaptError, match="the model being trained"):
        run(config(corpus, tmp_path / "self", **options), model=student, teacher=student)
    assert not (tmp_path / "self").exists()
    with pytest.raises(ModAdaptError, match="not both"):
        run(
            config(corpus, tmp_path / "both", teacher="tiny-llama", **options),
            model=copy.deepcopy(pruned),
            teacher=original,
        )
    wider = modadapt.build_preset("tiny-llama", seed=1)
    wider.resize_token_embeddings(300)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ModAdaptError, match="vocabulary"):
        run(config(corpus, tmp_path / "mismatch", teacher=str(tmp_path / "wider"), **options), model=pruned)
    with pytest.raises(ModAdaptError, match="distill is 0"):
        config(corpus, tmp_path / "off", teacher="tiny-llama", distill=0.0)


def test_python_model_distillation_and_flops_ratio(corpus, tmp_path):
    # A model converted in Python, eager attention (the flop counter sees its attention matmuls),
    # threshold-p routers with random weights so that rows keep different, variable counts.
    model = modadapt.build_preset("tiny-llama", seed=1)
    model.config._attn_implementation = "eager"
    modadapt.convert(model, router="threshold-p", layers="every-other")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in modadapt.mod_layers(model):
            layer.router.scorer.weight.copy_(torch.randn(layer.router.scorer.weight.shape, generator=generator))
    cfg = config(
        corpus,
        tmp_path / "run",
        train="all",
        distill=0.5,
        max_steps=2,
        eval_batch_size=3,
        lr=1e-3,
        router="ignored-for-a-converted-model",
    )
    summary = run(cfg, model=model)
    assert all(d > 0 for d in summary["history"]["distill_loss"])
    kept = summary["kept_fraction"]["after"]
    assert set(kept) == {"1", "3"} and all(0.1 < f < 0.9 for f in kept.values())

    adapted = modadapt.load(tmp_path / "run" / "model")
    adapted.config._attn_implementation = "eager"
    blocks = pack(tokenize(read_corpus(cfg.valid_data), None, 256), cfg.seq_len, "valid")
    dense = modadapt.unload(copy.deepcopy(adapted))
    ratio = direct_count(adapted, blocks) / direct_count(dense, blocks)
    # rel 1e-4: the count runs eager attention, the recipe SDPA; on transformers 5.17 the two ratios
    # are 1.6e-5 apart (rounding reaches the routing); a wrong count is off by percents
    assert summary["flops_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert summary["flops_ratio"] < 0.95


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_trains_routers_and_adapters(corpus, tmp_path):
    summary = run(config(corpus, tmp_path / "lora", train="lora", lora_rank=2, max_steps=2))
    dense = modadapt.build_preset("tiny-llama", seed=0).state_dict()
    adapted = modadapt.load(tmp_path / "lora" / "model").state_dict()
    assert not any("lora" in k for k in adapted)  # merged into the weights
    assert set(adapted) - {k for k in adapted if ".router." in k} == set(dense)
    assert not torch.equal(
        adapted["model.layers.1.self_attn.q_proj.weight"], dense["model.layers.1.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(adapted["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert summary["trainable_parameters"] < sum(v.numel() for v in dense.values()) // 4


def test_bad_inputs_are_clear_errors_and_leave_no_directory(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["train", "lm-adapt", "--data", str(tmp_path / "missing.txt"), "-o", str(out), "--cpu"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ModAdaptError, match="holds no text"):
        run(config(corpus, out, data=str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ModAdaptError, match="fewer than one block"):
        run(config(corpus, out, valid_data=str(tmp_path / "short.txt")))
    with pytest.raises(ModAdaptError, match="train must be one of"):
        config(corpus, out, train="everything")
    with pytest.raises(ModAdaptError, match="nothing to train"):
        run(config(corpus, out, router="random"))
    with pytest.raises(ModAdaptError, match="no checkpoint"):
        run(config(corpus, out, resume=True))
    code = main(
        ["train", "lm-adapt", "--data", str(corpus / "train.txt"), "-o", str(out), "--cpu", "--seq-len", "1024"]
    )
    assert code == 2 and "longer than the model's max_position_embeddings 512" in capsys.readouterr().err
    code = main(
        [
            "train",
            "lm-adapt",
            "--data",
            str(corpus / "train.txt"),
            "-o",
            str(out),
            "--cpu",
            "--router",
            "topk",
            "--router-arg",
            "colour=red",
        ]
    )
    assert code == 2 and "colour" in capsys.readouterr().err
    file = tmp_path / "c.yaml"
    file.write_text(f"data: {corpus / 'train.txt'}\noutput: {out}\nseq_lenn: 8\n")
    with pytest.raises(ModAdaptError, match="seq_lenn"):
        LMAdaptConfig.resolve(str(file), {})
    assert not out.exists()


def test_datasets_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).to_parquet(str(tmp_path / "part.parquet"))
    assert read_corpus(str(tmp_path / "part.parquet")) == "alpha beta\n\ngamma"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ModAdaptError, match="no 'text' column"):
        read_corpus(str(tmp_path / "saved"))


def test_eval_cli(corpus, routers_run, capsys, tmp_path):
    out, summary = routers_run
    valid = str(corpus / "valid.jsonl.gz")
    assert main(["eval", str(out / "model"), "--data", valid, "--seq-len", "32", "--quiet", "--json"]) == 0
    converted = json.loads(capsys.readouterr().out)
    assert converted["ppl"] == pytest.approx(summary["valid_ppl"]["converted_after"], rel=1e-5)
    assert converted["kept_fraction"] == pytest.approx(summary["kept_fraction"]["after"])
    assert main(["eval", str(out / "model"), "--data", valid, "--seq-len", "32", "--quiet", "--dense"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("dense perplexity") and f"{summary['valid_ppl']['dense']:.4f}" in text
    # Without --seq-len, a run's model is evaluated at the run's own (32, not 256), on the device asked for.
    for model in (out / "model", out):
        assert main(["eval", str(model), "--data", valid, "--quiet", "--json", "--device", "cpu"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["ppl"] == pytest.approx(summary["valid_ppl"]["converted_after"], rel=1e-5)
        assert (result["seq_len"], result["device"]) == (32, "cpu")
    assert main(["eval", str(out / "checkpoint"), "--data", valid]) == 2
    assert "is neither a directory saved by modadapt.save" in capsys.readouterr().err
    assert main(["eval", str(out / "model"), "--data", valid, "--device", "cuda:99"]) == 2
    assert "CUDA device(s)" in capsys.readouterr().err
    assert main(["eval", str(out / "model"), "--data", valid, "--device", "gpu"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    assert main(["eval", str(out / "model"), "--data", str(tmp_path / "nope.txt")]) == 2


def test_lm_eval_helper_is_a_clear_error_without_lm_eval(routers_run):
    from modadapt.recipes.lm_adapt import lm_eval_model

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed")
    with pytest.raises(ModAdaptError, match="pip install lm-eval"):
        lm_eval_model(modadapt.load(routers_run[0] / "model"), tokenizer=object())


def load_quality_benchmark(monkeypatch):
    bench = load_benchmark("lm_quality", monkeypatch)
    if not (bench.DEFAULT_DATA / "train.txt.gz").is_file():
        pytest.skip("the python-docs-3.11 corpus is not on this machine")
    return bench


def test_quality_benchmark_tiny(tmp_path, monkeypatch):
    bench = load_quality_benchmark(monkeypatch)
    with threads_restored():
        records = bench.main(["--tiny", "--work", str(tmp_path)])
    assert json.loads((tmp_path / "lm_quality.json").read_text()) == records
    assert [r["variant"] for r in records] == [
        "dense",
        "dense-adapt",
        "topk",
        "attention",
        "random",
        "layer-drop",
        "threshold-p-a0.01",
        "threshold-p-a0.1",
        "random-matched",
        "layer-drop-matched",
    ]
    for record in records:
        assert {"router", "valid_ppl", "flops_ratio", "kept_fraction"} <= set(record)
        assert record["valid_ppl"] > 1 and 0 < record["flops_ratio"] <= 1 and 0 <= record["kept_fraction"] <= 1
    by = {r["variant"]: r for r in records}
    assert by["dense-adapt"]["valid_ppl_before"] == pytest.approx(by["dense"]["valid_ppl"], rel=1e-5)
    assert all(by[v]["valid_ppl_topk_routing"] > 1 for v in ("topk", "attention", "random"))
    thresholds = [by["threshold-p-a0.01"], by["threshold-p-a0.1"]]
    assert json.loads(by["random-matched"]["arguments"])["capacity"] == pytest.approx(
        max(sum(r["kept_fraction"] for r in thresholds) / 2, 1 / 32), abs=1e-3
    )
    assert by["layer-drop-matched"]["target_flops_ratio"] == pytest.approx(
        sum(r["flops_ratio"] for r in thresholds) / 2
    )
    table = (tmp_path / "lm_quality.md").read_text()
    assert by["layer-drop"]["flops_ratio"] < 1 and "| layer-drop |" in table
    assert "## Goals (issue 7)" in table and "| no NaN or divergence |" in table


def test_quality_benchmark_continues_from_saved_weights(tmp_path, monkeypatch):
    """A run split over calls (the GPU machine's 10-minute limit): the second call loads the saved
    bf16 model, reproduces the dense perplexity and appends its variants."""
    bench = load_quality_benchmark(monkeypatch)
    pretrained = tmp_path / "pretrained"
    with threads_restored():
        first = bench.main(
            ["--tiny", "--work", str(tmp_path), "--variants", "random", "--save-pretrained", str(pretrained)]
        )
        second = bench.main(
            [
                "--tiny",
                "--work",
                str(tmp_path),
                "--variants",
                "random,topk",
                "--pretrained",
                str(pretrained),
                "--append",
            ]
        )
    assert [r["variant"] for r in first] == ["dense", "random"]
    assert [r["variant"] for r in second] == ["dense", "topk", "random"]  # run order, whatever the call
    assert [second[0], second[2]] == first and second[1]["command"] != first[1]["command"]
    reloaded, saved = bench.load_pretrained(pretrained)
    valid = str(tmp_path / "valid.txt")
    blocks = bench.spread_blocks(bench.pack(bench.tokenize(bench.read_corpus(valid), None, bench.VOCAB), 32, valid), 8)
    again = bench.dense_record(reloaded, blocks, bench.parse_args(["--tiny"]))
    assert again["valid_ppl"] == pytest.approx(first[0]["valid_ppl"], rel=1e-5) and saved == {
        k: v for k, v in first[0].items() if k != "command"
    }
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main(["--tiny", "--work", str(tmp_path), "--variants", "nope"])


def test_quality_goals_are_judged_from_the_records(monkeypatch):
    bench = load_quality_benchmark(monkeypatch)
    rec = lambda variant, router, ppl, flops, **extra: dict(
        variant=variant, router=router, valid_ppl=ppl, flops_ratio=flops, **extra
    )
    records = [
        rec("dense", "dense", 2.0, 1.0),
        rec("dense-adapt", "dense", 1.9, 1.0),
        rec("topk", "topk", 2.2, 0.56),
        rec("random", "random", 2.3, 0.55),
        rec("layer-drop", "layer-drop", 2.6, 0.50),
        rec("layer-drop-matched", "layer-drop", 2.0, 0.625),
        rec("threshold-p-a0.1", "threshold-p", 2.05, 0.70),
    ]
    judged = {goal: (measured, met) for goal, measured, met in bench.goals(records)}
    assert judged["threshold-p within 3% of dense ppl at >= 25% fewer FLOPs"][1]
    assert judged["topk beats random at matched FLOPs"][1]  # 2.2 < 2.3 at 0.55, the nearest run
    # layer dropping at 0.56: 2.6 + 0.06 / 0.125 * (2.0 - 2.6) = 2.312 on the line between its two runs
    measured, met = judged["topk beats layer-drop at matched FLOPs"]
    assert met and "2.312" in measured and "interpolated" in measured
    # threshold-p at 0.70: between layer-drop-matched (0.625, 2.0) and dense-adapt (1.0, 1.9): 1.98 < 2.05
    assert not judged["threshold-p-a0.1 beats layer-drop at matched FLOPs"][1]
    # random at 0.70: between its run (0.55, 2.3) and dense-adapt (1.0, 1.9): 2.167 > 2.05
    measured, met = judged["threshold-p-a0.1 beats random at matched FLOPs"]
    assert met and "2.167" in measured
    del records[1]  # without dense-adapt nothing brackets 0.70, and no random run is near it
    measured, met = {g: (m, ok) for g, m, ok in bench.goals(records)}["threshold-p-a0.1 beats random at matched FLOPs"]
    assert not met and "no baseline run near" in measured
    assert judged["no NaN or divergence"][1]
    records[1]["valid_ppl"] = 8e9  # a diverged run (topk)
    judged = {goal: met for goal, _, met in bench.goals(records)}
    assert not judged["no NaN or divergence"] and not judged["topk beats random at matched FLOPs"]


def test_a_mixture_of_experts_logs_its_balancing_loss_apart(tmp_path):
    """tiny-mixtral: `outputs.loss` holds the experts' load-balancing loss (over kept tokens); the
    history logs it as `expert_loss`, so `lm_loss` is the language-model loss alone."""
    from conftest import lm_adapt_config

    summary = run(lm_adapt_config(tmp_path, model="tiny-mixtral", max_steps=2, train="routers"))
    history = summary["history"]
    coef = modadapt.build_preset("tiny-mixtral").config.router_aux_loss_coef
    assert coef > 0 and all(e > 0 for e in history["expert_loss"])
    for loss, lm, aux, experts in zip(history["loss"], history["lm_loss"], history["aux_loss"], history["expert_loss"]):
        assert loss == pytest.approx(lm + aux + experts, rel=1e-5)
        assert experts / coef == pytest.approx(2.0, rel=0.25)  # E * sum_e f_e P_e: top_k = 2 when balanced


def test_defaults_are_the_quality_benchmarks_best_setting():
    """docs/recipes.md: lm-adapt converts with topk and distils by default (the best setting on
    the 97.5M benchmark)."""
    cfg = LMAdaptConfig(data="train.txt", output="run")
    assert (cfg.router, cfg.distill) == ("topk", 1.0)


def test_a_dense_model_converts_with_the_scope_asked_for(corpus, tmp_path):
    """`--scope attention` (a dense model converted on the fly): the saved model routes the
    attention sublayer only, and the FLOPs count says so (more than a block router's at the same
    capacity: every token still goes through the MLP)."""
    ratios = {}
    for scope in ("attention", "block"):
        summary = run(config(corpus, tmp_path / scope, scope=scope, max_steps=1, layers="evenly:2"))
        assert state_of(modadapt.load(tmp_path / scope / "model")).config.scope == scope
        ratios[scope] = summary["flops_ratio"]
    assert ratios["block"] < ratios["attention"] < 1.0
    with pytest.raises(ModAdaptError, match="scope must be one of block, attention, mlp"):
        config(corpus, tmp_path / "bad", scope="heads")
