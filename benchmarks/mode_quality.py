"""Integrated vs staged MoDE at matched FLOPs on real text (issue 18, item 2).

1. Pretrain a small Mixtral (byte-level vocabulary; ``--experts`` experts per layer, top
   ``--top-k``) dense from scratch on the training split of ``python-docs-3.11``, as
   ``lm_quality.py`` pretrains its Llama (its loop, bf16 rounding, ``--save-pretrained`` /
   ``--pretrained``).
2. Adapt copies of it with one budget through the `lm-adapt` recipe (same steps, batch, learning
   rate, data order; ``--train``), each routing the same layers (``--layers``, default every one
   but the first) at each ``--capacities`` level c, so that about c of those layers' expert slots
   run:
   - ``dense-adapt``: the dense mixture of experts, given the same training;
   - ``integrated-c``: integrated MoDE, ``noop-expert`` at capacity c (c of the slots run; a token
     with none left skips the MLP);
   - ``staged-mlp-c``: staged MoDE, ``topk`` in front of the experts (scope 'mlp') at capacity c:
     the same slot count, whole tokens in or out;
   - ``staged-block-c``: staged MoDE over whole blocks (``topk``, scope 'block': attention too), its
     capacity solved from the FLOPs model to integrated's FLOPs;
   - ``expert-drop-c``: the static baseline at the same slot count: those layers' routers keep
     fewer experts per token (top-2 -> top-1 at c = 0.5; `expert_drop.top_k_plan`). Removing the
     least-used experts would save memory, not FLOPs (every token still runs k), so at matched
     FLOPs the honest static baseline is a smaller top-k.
3. Records (``variant``, ``method``, ``valid_ppl``, ``flops_ratio`` = FLOPs per token over the
   dense model's from lm-adapt's evaluation (the routing decisions made there, causal rules for the
   routers), ``expert_slot_share`` (routed layers' expert slots that ran on the validation
   blocks), ``kept_fraction`` (tokens that reached the routed layers' experts), ...) go to
   ``--out`` after every variant, with a Markdown table beside it that compares integrated MoDE
   with each other method at matched FLOPs (the other's perplexity interpolated between its runs
   and dense-adapt at 1.0, as `lm_quality.baseline_ppl` does).

    python benchmarks/mode_quality.py --tiny --work /tmp/mq          # CPU smoke test, seconds
    python benchmarks/mode_quality.py --data-dir data --mixed-precision bf16 --save-pretrained runs/mixtral
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import lm_quality  # noqa: E402
from expert_drop import reduce_top_k, top_k_plan  # noqa: E402

import modadapt  # noqa: E402
from modadapt.config import normalize_layer_spec, resolve_layers  # noqa: E402
from modadapt.metrics.flops import flops_table, sequence_flops  # noqa: E402
from modadapt.recipes.lm_adapt import pack, read_corpus, tokenize  # noqa: E402
from modadapt.routers.base import kept_count  # noqa: E402

VOCAB = lm_quality.VOCAB
METHODS = ("integrated", "staged-mlp", "staged-block", "expert-drop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", default=str(lm_quality.DEFAULT_DATA), help="directory with train.txt.gz and valid.txt.gz"
    )
    p.add_argument(
        "--out", help="JSON records (default: benchmarks/results/mode_quality.json; --tiny: WORK/mode_quality.json)"
    )
    p.add_argument("--work", default="/tmp/modadapt-mode-quality", help="run directories")
    p.add_argument("--tiny", action="store_true", help="tiny model and budget on a slice of the text (CPU smoke test)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=8, help="decoder layers")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8, help="experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--expert-size", type=int, default=512, help="intermediate size of one expert")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--adapt-steps", type=int, default=500)
    p.add_argument("--adapt-lr", type=float, default=3e-4)
    p.add_argument("--train", default="all", choices=["routers", "lora", "all"], help="what adaptation trains")
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight of the recipe")
    p.add_argument("--layers", default="all-but-first", help="the layers every method routes (a ModConfig layers spec)")
    p.add_argument("--capacities", default="0.5", help="comma list: share of the routed layers' expert slots that run")
    p.add_argument("--max-eval-blocks", type=int, default=0, help="cap the validation blocks, evenly spaced (0: all)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="all", help="comma list of variants to run (default: all)")
    p.add_argument("--pretrained", help="load the dense model from this directory instead of pretraining")
    p.add_argument("--save-pretrained", help="after pretraining, save the dense model here (bf16, 15 MB shards)")
    p.add_argument("--append", action="store_true", help="keep the records already in --out and skip their variants")
    p.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds (0: no limit)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants adapted at once, each in a process of its own (a 59M model leaves a GPU idle); "
        "the dense model goes to them through --pretrained or --save-pretrained",
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and not (args.pretrained or args.save_pretrained):
        p.error("--jobs > 1 hands the dense model to its processes on disk: give --pretrained or --save-pretrained")
    if args.tiny:
        args.hidden, args.num_layers, args.heads, args.experts, args.expert_size = 32, 4, 4, 4, 32
        args.seq_len, args.batch_size, args.pretrain_steps, args.adapt_steps, args.max_eval_blocks = 32, 8, 20, 3, 8
    args.capacities = [float(c) for c in args.capacities.split(",")]
    if not all(0 < c < 1 for c in args.capacities):
        p.error(f"--capacities must be in (0, 1), got {args.capacities}")
    args.out = (
        Path(args.out)
        if args.out
        else (Path(args.work) / "mode_quality.json" if args.tiny else ROOT / "results" / "mode_quality.json")
    )
    return args


def build_dense(args: argparse.Namespace) -> nn.Module:
    """A Mixtral of `lm_quality.build_dense`'s shape whose MLPs are mixtures of experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=args.expert_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,  # the experts' load-balancing loss trains, in pretraining too
        router_aux_loss_coef=0.01,
        max_position_embeddings=max(2048, args.seq_len),
        sliding_window=None,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config)


def variant_names(args: argparse.Namespace) -> list[str]:
    return ["dense-adapt"] + [f"{method}-{c:g}" for c in args.capacities for method in METHODS]


def split_variant(name: str) -> tuple[str, float | None]:
    if name == "dense-adapt":
        return "dense", None
    method, _, capacity = name.rpartition("-")
    return method, float(capacity)


def integrated_ratio(dense: nn.Module, routed: list[int], capacity: float, seq_len: int) -> float:
    """Ideal FLOPs per token of `noop-expert` at `capacity` over the dense model's: every token
    enters, `ceil(capacity * k * T)` slots run, the experts' router scores every token once more."""
    model = modadapt.convert(copy.deepcopy(dense), router="noop-expert", capacity=capacity, layers=routed)
    table, config = flops_table(model), dense.config
    k = config.num_experts_per_tok
    kept = {i: (seq_len, kept_count(capacity, seq_len * k)) for i in routed}
    rescore = 2 * seq_len * config.num_local_experts * config.hidden_size * len(routed)
    return (sequence_flops(table, seq_len, kept) + rescore) / sequence_flops(flops_table(dense), seq_len)


def solve_block_capacity(dense: nn.Module, routed: list[int], target: float, seq_len: int) -> float:
    """The `topk` (scope 'block') capacity whose ideal FLOPs ratio is closest to `target` (at most
    it; tokens come whole)."""
    table = flops_table(modadapt.convert(copy.deepcopy(dense), router="topk", capacity=0.5, layers=routed))
    full = sequence_flops(flops_table(dense), seq_len)
    best = 1 / seq_len
    for kept in range(1, seq_len + 1):
        if sequence_flops(table, seq_len, {i: kept for i in routed}) / full <= target:
            best = kept / seq_len
    return best


@torch.no_grad()
def slot_share(model: nn.Module, blocks: torch.Tensor, routed: list[int], top_k: int, batch: int) -> dict:
    """On `blocks` (eval mode): the share of the routed layers' expert slots (`top_k` per token)
    that ran an expert, and of their tokens that reached the experts."""
    device = next(model.parameters()).device
    model.eval()
    ran = tokens = reached = 0
    for chunk in blocks.split(batch):
        model(input_ids=chunk.to(device), use_cache=False)
        rows = {row["layer"]: row for row in modadapt.expert_stats(model)}
        tokens += chunk.numel() * len(routed)
        for i in routed:
            row = rows.get(i)
            if row is not None:
                ran += sum(row["expert_tokens"])
                reached += row["tokens"]
    return {"expert_slot_share": ran / (top_k * tokens), "kept_fraction": reached / tokens}


def write(records: list[dict], out: Path, meta: dict) -> None:
    lines = [
        *lm_quality.write_records(records, out, f"Integrated vs staged MoDE: {meta['description']}"),
        "| variant | method | arguments | valid ppl | ppl before adapt | FLOPs / dense | expert slots run | "
        "tokens into experts | skipped steps | adapt s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        before, wall = lm_quality.cell(r, "valid_ppl_before"), lm_quality.cell(r, "wall_s", ".0f")
        lines.append(
            f"| {r['variant']} | {r['method']} | {r.get('arguments', '')} | {r['valid_ppl']:.3f} | {before} | "
            f"{r['flops_ratio']:.3f} | {r['expert_slot_share']:.3f} | {r['kept_fraction']:.3f} | "
            f"{r.get('skipped_steps', 0)} | {wall} |"
        )
    lines += [
        "",
        "## Integrated MoDE against each method at matched FLOPs",
        "",
        "| integrated | against | its ppl at these FLOPs | integrated ppl | integrated better |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {a} | {b} | {measured} | {ppl:.3f} | {'yes' if better else '**no**'} |"
        for a, b, measured, ppl, better in comparisons(records)
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def comparisons(records: list[dict]) -> list[tuple[str, str, str, float, bool]]:
    """(integrated variant, other method, its perplexity at the same FLOPs and how it was found,
    integrated's perplexity, whether integrated is lower and the FLOPs were matched)."""
    out = []
    for run in (r for r in records if r["method"] == "integrated"):
        for other in ("dense", *METHODS[1:]):
            if other == "dense":
                ref = next((r for r in records if r["variant"] == "dense-adapt"), None)
                if ref is None:
                    continue
                found = (ref["valid_ppl"], "dense-adapt (FLOPs 1.0)", True)
            else:
                found = lm_quality.baseline_ppl(records, other, run["flops_ratio"], key="method")
                if found is None:
                    continue
            ppl, how, matched = found
            out.append(
                (run["variant"], other, f"{ppl:.3f} ({how})", run["valid_ppl"], matched and run["valid_ppl"] < ppl)
            )
    return out


# `modadapt.expert_stats` counts the experts' slots through a converted model's records, so the
# methods with nothing to route convert layer 1 with `random` at capacity 1.0: exactly the dense layer.
COUNTED_DENSE = {"router": "random", "capacity": 1.0, "layers": [1]}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.time()
    known = variant_names(args)
    work, device, (train_file, valid_file), valid_blocks, wanted, records = lm_quality.start_run(args, known)
    done = {r["variant"] for r in records}
    if args.pretrained:
        dense, saved = lm_quality.load_pretrained(Path(args.pretrained))
        print(f"dense Mixtral loaded from {args.pretrained}", flush=True)
        record = lm_quality.dense_record(
            dense.to(device).eval(), valid_blocks, args, pretrain_final_loss=saved.get("pretrain_final_loss")
        )
    else:
        train_blocks = pack(tokenize(read_corpus(train_file), None, VOCAB), args.seq_len, train_file)
        dense = build_dense(args)
        print(
            f"dense Mixtral: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters, "
            f"{len(train_blocks)} training blocks of {args.seq_len} bytes",
            flush=True,
        )
        losses = lm_quality.pretrain(dense, train_blocks, args, device)
        lm_quality.round_to_bf16(dense)
        record = lm_quality.dense_record(
            dense.eval(), valid_blocks, args, pretrain_final_loss=losses[-1], pretrain_s=time.time() - start
        )
        if args.save_pretrained:
            lm_quality.save_pretrained(dense, Path(args.save_pretrained), record)
    dense.to("cpu").eval()
    command = "python benchmarks/mode_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record.update(method="dense", expert_slot_share=1.0, command=command)
    records = [record] + [r for r in records if r["variant"] != "dense"]
    config = dense.config
    routed = resolve_layers(normalize_layer_spec(args.layers), config.num_hidden_layers)
    top_k = config.num_experts_per_tok
    meta = {
        "description": f"Mixtral {config.num_hidden_layers}x{config.hidden_size}, {config.num_local_experts} experts "
        f"(top {top_k}) of {config.intermediate_size}, byte-level, routed layers {routed}, "
        f"{args.adapt_steps} adaptation steps (train: {args.train})"
    }
    order = ["dense", *known]
    write(records, args.out, meta)
    files = (train_file, valid_file)
    if args.jobs > 1:
        return in_processes(args, argv, records, done, wanted, order, meta, start)

    for name in wanted:
        if lm_quality.left_out(name, done, args, start):
            continue
        began = time.time()
        method, capacity = split_variant(name)
        model, routing, arguments, static = copy.deepcopy(dense), {}, {}, 1.0
        if method == "integrated":
            modadapt.convert(model, router="noop-expert", capacity=capacity, layers=routed)
            arguments = {"capacity": capacity}
        elif method == "staged-mlp":
            modadapt.convert(model, router="topk", capacity=capacity, layers=routed, scope="mlp")
            arguments = {"capacity": capacity, "scope": "mlp"}
        elif method == "staged-block":
            target = integrated_ratio(dense, routed, capacity, args.seq_len)
            block = solve_block_capacity(dense, routed, target, args.seq_len)
            modadapt.convert(model, router="topk", capacity=block, layers=routed)
            arguments = {"capacity": block, "scope": "block", "target_flops_ratio": round(target, 4)}
        elif method == "expert-drop":
            plan = top_k_plan(routed, top_k, capacity)
            model = reduce_top_k(dense, plan)
            full = sequence_flops(flops_table(dense), args.seq_len)
            static = sequence_flops(flops_table(model), args.seq_len) / full
            arguments = {"top_k": {str(i): k for i, k in plan.items()}}
            routing = COUNTED_DENSE
        else:  # dense-adapt
            routing = COUNTED_DENSE
        summary = lm_quality.adapt_variant(args, work / name, model, files, device, **routing)
        shares = slot_share(model, valid_blocks, routed, top_k, args.batch_size)
        record = {
            "variant": name,
            "method": method,
            "arguments": json.dumps(arguments),
            "valid_ppl_before": summary["valid_ppl"]["converted_before"],
            "flops_ratio": summary["flops_ratio"] * static,  # a smaller top-k: relative to the dense top-k
            **shares,
        }
        record = lm_quality.add_record(records, record, summary, began, command, order)
        write(records, args.out, meta)
        print(
            f"{name}: valid ppl {record['valid_ppl']:.3f}, FLOPs ratio {record['flops_ratio']:.3f}, "
            f"expert slots {record['expert_slot_share']:.3f}, {record['wall_s']:.0f}s",
            flush=True,
        )
    return report(records, args, start)


def report(records: list[dict], args: argparse.Namespace, start: float, how: str = "") -> list[dict]:
    """Print integrated MoDE against each method and the call's time; return the records."""
    for a, b, measured, ppl, better in comparisons(records):
        print(f"{a} vs {b}: {ppl:.3f} vs {measured} -> {'integrated better' if better else 'not better'}", flush=True)
    print(f"{time.time() - start:.0f}s in all{how}; records in {args.out}", flush=True)
    return records


# Options a parent hands its processes itself (with their values, but `--append`).
_OWN = ("--jobs", "--variants", "--out", "--work", "--pretrained", "--save-pretrained", "--budget-s", "--append")


def _without_own(argv: list[str]) -> list[str]:
    """`argv` without the options `in_processes` sets for each process."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OWN:
            skip = "=" not in arg and name != "--append"
            continue
        kept.append(arg)
    return kept


def in_processes(args, argv, records, done, wanted, order, meta, start) -> list[dict]:
    """`--jobs N`: the variants still to run, dealt round-robin to N processes of this script
    (each its own work folder and records file, the dense model from disk), then their records
    merged into `--out` with the table. A process that fails is named; its finished variants count."""
    import subprocess

    todo = [name for name in wanted if name not in done and name != "dense"]
    pretrained = args.pretrained or args.save_pretrained
    base = _without_own(sys.argv[1:] if argv is None else list(argv))
    procs = []
    for i in range(min(args.jobs, len(todo))):
        share = todo[i :: args.jobs]
        part = Path(args.work) / f"job-{i}"
        command = [sys.executable, str(Path(__file__).resolve()), *base, "--pretrained", str(pretrained)]
        command += ["--variants", ",".join(share), "--work", str(part), "--out", str(part / "records.json")]
        if args.budget_s:
            command += ["--budget-s", f"{max(1.0, args.budget_s - (time.time() - start)):.0f}"]
        shutil.rmtree(part, ignore_errors=True)  # a process's records are its own call's
        procs.append((share, part, subprocess.Popen(command)))
    for share, part, proc in procs:
        if proc.wait() != 0:
            print(f"the process running {','.join(share)} failed (exit {proc.returncode})", flush=True)
        found = part / "records.json"
        for record in json.loads(found.read_text()) if found.is_file() else []:
            if record["variant"] != "dense" and record["variant"] not in done:
                records.append(record)
                done.add(record["variant"])
    records.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    write(records, args.out, meta)
    return report(records, args, start, f" ({len(procs)} processes)")


if __name__ == "__main__":
    main()
