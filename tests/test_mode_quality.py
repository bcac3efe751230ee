"""benchmarks/mode_quality.py: integrated vs staged MoDE at matched FLOPs, its tiny CPU run and
its static baseline (a smaller top-k)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import BENCHMARKS, load_benchmark, threads_restored


def test_tiny_run_writes_every_method_at_matched_slots(tmp_path, monkeypatch):
    bench = load_benchmark("mode_quality", monkeypatch)
    if not (Path(bench.lm_quality.DEFAULT_DATA) / "train.txt.gz").is_file():
        pytest.skip("the python-docs-3.11 corpus is not on this machine")
    with threads_restored():
        records = bench.main(["--tiny", "--work", str(tmp_path)])
    assert json.loads((tmp_path / "mode_quality.json").read_text()) == records
    by = {r["variant"]: r for r in records}
    assert list(by) == [
        "dense",
        "dense-adapt",
        "integrated-0.5",
        "staged-mlp-0.5",
        "staged-block-0.5",
        "expert-drop-0.5",
    ]
    for r in records:
        assert r["valid_ppl"] > 1 and 0 < r["flops_ratio"] <= 1.01 and 0 < r["expert_slot_share"] <= 1
    assert by["dense-adapt"]["valid_ppl_before"] == pytest.approx(by["dense"]["valid_ppl"], rel=1e-5)
    assert by["expert-drop-0.5"]["expert_slot_share"] == 0.5  # top-2 -> top-1 on every routed layer
    assert json.loads(by["expert-drop-0.5"]["arguments"])["top_k"] == {"1": 1, "2": 1, "3": 1}
    # integrated MoDE runs about half of the slots after 3 steps of calibration, at about the FLOPs of top-1
    assert by["integrated-0.5"]["expert_slot_share"] == pytest.approx(0.5, abs=0.15)
    assert by["integrated-0.5"]["flops_ratio"] == pytest.approx(by["expert-drop-0.5"]["flops_ratio"], abs=0.06)
    block = json.loads(by["staged-block-0.5"]["arguments"])
    assert block["scope"] == "block" and 0 < block["capacity"] < 1
    table = (tmp_path / "mode_quality.md").read_text()
    assert "## Integrated MoDE against each method at matched FLOPs" in table
    assert all(f"| integrated-0.5 | {m} |" in table for m in ("dense", "staged-mlp", "staged-block", "expert-drop"))


def test_jobs_run_the_variants_in_processes_and_merge_what_one_process_gives(tmp_path, monkeypatch, capsys):
    """`--jobs 2`: the same records as one process (the dense model handed over on disk), one table;
    `--jobs` without a dense model on disk, or below 1, is one clear error."""
    bench = load_benchmark("mode_quality", monkeypatch)
    if not (Path(bench.lm_quality.DEFAULT_DATA) / "train.txt.gz").is_file():
        pytest.skip("the python-docs-3.11 corpus is not on this machine")
    tiny = ["--tiny", "--variants", "dense-adapt,integrated-0.5,expert-drop-0.5"]
    with threads_restored():
        one = bench.main([*tiny, "--work", str(tmp_path / "one")])
        two = bench.main(
            [*tiny, "--work", str(tmp_path / "two"), "--jobs", "2", "--save-pretrained", str(tmp_path / "dense")]
        )
    assert (
        [r["variant"] for r in two]
        == [r["variant"] for r in one]
        == [
            "dense",
            "dense-adapt",
            "integrated-0.5",
            "expert-drop-0.5",
        ]
    )
    for a, b in zip(one, two):
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-4) and b["flops_ratio"] == pytest.approx(
            a["flops_ratio"], rel=1e-4
        )
    assert json.loads((tmp_path / "two" / "mode_quality.json").read_text()) == two
    assert "| integrated-0.5 | expert-drop |" in (tmp_path / "two" / "mode_quality.md").read_text()
    assert bench._without_own(["--tiny", "--jobs", "2", "--out=x", "--append", "--seed", "1"]) == [
        "--tiny",
        "--seed",
        "1",
    ]
    for bad, said in ((["--jobs", "2"], "--pretrained or --save-pretrained"), (["--jobs", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--tiny", *bad])
        assert said in capsys.readouterr().err


def test_staged_block_capacity_matches_integrated_flops(tiny, monkeypatch):
    bench = load_benchmark("mode_quality", monkeypatch)
    dense = tiny("mixtral")
    routed, T = [1, 2, 3], 32
    target = bench.integrated_ratio(dense, routed, 0.5, T)
    capacity = bench.solve_block_capacity(dense, routed, target, T)
    import modadapt
    from modadapt.metrics.flops import flops_table, sequence_flops

    table = flops_table(modadapt.convert(tiny("mixtral"), router="topk", capacity=capacity, layers=routed))
    full = sequence_flops(flops_table(dense), T)
    ratio = lambda kept: sequence_flops(table, T, {i: kept for i in routed}) / full  # noqa: E731
    kept = round(capacity * T)
    assert ratio(kept) <= target < ratio(kept + 1)
    assert 0.5 < capacity < 1  # a block skips attention too, so it keeps more tokens than 0.5


def test_expert_drop_plan_and_copy(tiny, ids):
    sys.path.insert(0, str(BENCHMARKS))
    from expert_drop import reduce_top_k, top_k_plan

    assert top_k_plan([1, 2, 3], 2, 0.5) == {1: 1, 2: 1, 3: 1}
    mixed = top_k_plan(list(range(1, 9)), 2, 0.75)
    assert sorted(mixed.values()) == [1] * 4 + [2] * 4 and sum(mixed.values()) / (2 * 8) == 0.75
    with pytest.raises(ValueError, match="no expert"):
        top_k_plan([1, 2], 2, 0.25)
    dense = tiny("mixtral")
    reduced = reduce_top_k(dense, {1: 1, 3: 1})
    assert [layer.mlp.gate.top_k for layer in reduced.model.layers] == [2, 1, 2, 1]
    assert [layer.mlp.gate.top_k for layer in dense.model.layers] == [2, 2, 2, 2]  # a copy
    with torch.no_grad():
        assert torch.isfinite(reduced(ids(2, 8)).logits).all()
