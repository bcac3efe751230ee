"""Quality benchmark on real text: do converted LMs keep their quality at fewer FLOPs? (issue 7)

1. Pretrain a small Llama (byte-level vocabulary of 256) dense from scratch on the training split
   of ``python-docs-3.11``: the "pretrained" model (weights rounded to bf16, so a later process
   that loads them with ``--pretrained`` continues from exactly the same model).
2. Adapt the dense model itself with the same budget (``dense-adapt``: what further training alone
   does to perplexity), and convert copies of it (every other layer from layer 1) at two compute
   levels:
   - capacity level: ``topk``, ``attention`` and ``random`` at 12.5%, and ``layer-drop`` (evenly
     spaced layers deleted until FLOPs per token are closest to ``topk``'s ideal ones);
   - threshold level: ``threshold-p`` (each of ``--alphas``, load loss toward ``--target``), then
     ``random-matched`` at the kept fraction threshold-p reached and ``layer-drop-matched`` at its
     FLOPs.
3. Adapt each with the same budget through the `lm-adapt` recipe's Python API
   (`modadapt.recipes.lm_adapt.run`): same steps, batch, learning rate, data order, what trains.
4. Write records (``variant``, ``router``, ``valid_ppl``, ``flops_ratio`` = MoD / dense FLOPs per
   token, ``kept_fraction``, ``wall_s``, ...) to ``--out`` after every variant, and a
   Markdown table next to it that ends with the issue's goals, each measured and marked met or not.
   Capacity routers are also evaluated with the training-time top-k in eval mode (not causal, so
   perplexity only): the gap between that and the causal rule is the causal rule's.

The layer-dropped models and ``dense-adapt`` have no router to train; they go through the same
recipe unconverted (``router: none``, `EXACTLY_DENSE`), so they get the same optimizer, schedule
and data.

    python benchmarks/lm_quality.py --tiny                      # CPU smoke test, < 1 minute
    python benchmarks/lm_quality.py --mixed-precision bf16      # GPU: the real run
    # split over calls: pretrain and save once, then add variants to the same records
    python benchmarks/lm_quality.py --mixed-precision bf16 --variants topk --save-pretrained P
    python benchmarks/lm_quality.py --mixed-precision bf16 --pretrained P --append --variants random
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modadapt.metrics.flops import flops_table, sequence_flops
from modadapt.recipes.lm_adapt import (
    NO_ROUTER,
    LMAdaptConfig,
    evaluate,
    pack,
    read_corpus,
    run,
    spread_blocks,
    tokenize,
)
from modadapt.routers.base import kept_count

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from layer_drop import remove_layers  # noqa: E402

DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "python-docs-3.11"
VOCAB = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="directory with train.txt.gz and valid.txt.gz")
    p.add_argument(
        "--out", help="JSON records (default: benchmarks/results/lm_quality.json; --tiny: WORK/lm_quality.json)"
    )
    p.add_argument("--work", default="/tmp/modadapt-lm-quality", help="run directories and the pretrained model")
    p.add_argument("--tiny", action="store_true", help="tiny model and budget on a slice of the text (CPU smoke test)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=1500,
        help="about 2.4 epochs of the training text; after 4000 (6.5 epochs) a model with 3 of its 8 "
        "layers dropped and re-trained beat the dense one (2.360 vs 2.374): over-fitting",
    )
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--adapt-steps", type=int, default=500)
    p.add_argument("--adapt-lr", type=float, default=3e-4)
    p.add_argument(
        "--train",
        default="all",
        choices=["routers", "lora", "all"],
        help="what adaptation trains (routers: layer dropping, random and attention have nothing to train)",
    )
    p.add_argument("--alphas", default="0.01,0.03,0.1", help="threshold-p load-reducing loss weights")
    p.add_argument(
        "--target",
        type=float,
        default=0.4,
        help="threshold-p's target kept fraction per MoD layer (0.4 on every other layer: FLOPs ~0.70 x dense)",
    )
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight of the recipe")
    p.add_argument("--max-eval-blocks", type=int, default=0, help="cap the validation blocks, evenly spaced (0: all)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="all", help="comma list of variants to run (default: all; see the table)")
    p.add_argument(
        "--pretrained",
        help="load the dense model from this directory (written by --save-pretrained) instead of pretraining",
    )
    p.add_argument("--save-pretrained", help="after pretraining, save the dense model here (bf16, 15 MB shards)")
    p.add_argument("--append", action="store_true", help="keep the records already in --out and skip their variants")
    p.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds (0: no limit)")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.seq_len, args.batch_size = 32, 4, 4, 32, 8
        args.pretrain_steps, args.adapt_steps, args.max_eval_blocks = 20, 3, 8
        args.alphas = "0.01,0.1"
    args.out = (
        Path(args.out)
        if args.out
        else (Path(args.work) / "lm_quality.json" if args.tiny else ROOT / "results" / "lm_quality.json")
    )
    return args


def text_files(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """The train and valid files; with --tiny, slices of them written to `work`."""
    data = Path(args.data_dir)
    train, valid = data / "train.txt.gz", data / "valid.txt.gz"
    for file in (train, valid):
        if not file.is_file():
            raise SystemExit(f"{file} is missing; pass --data-dir")
    if not args.tiny:
        return str(train), str(valid)
    out = []
    for file, size in ((train, 40_000), (valid, 4_000)):
        with gzip.open(file, "rt", encoding="utf-8") as handle:
            text = handle.read(size)
        target = work / file.name.removesuffix(".gz")
        target.write_text(text)
        out.append(str(target))
    return out[0], out[1]


def build_dense(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 32 * 32 or 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq_len),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def pretrain(model: nn.Module, blocks: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Plain dense pretraining: AdamW, warm-up then cosine, bf16/fp16 autocast on GPU; a mixture
    of experts (mode_quality.py's Mixtral) adds its load-balancing loss as transformers weighs it."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.pretrain_steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.pretrain_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            out = model(input_ids=batch, use_cache=False)
        loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
        experts = out.get("aux_loss")
        if experts is not None:
            loss = loss + model.config.router_aux_loss_coef * experts.float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % max(1, args.pretrain_steps // 20) == 0 or step == args.pretrain_steps - 1:
            print(f"pretrain step {step}: loss {losses[-1]:.4f}", flush=True)
    return losses


def drop_layers(dense: nn.Module, target_ratio: float, seq_len: int) -> tuple[nn.Module, list[int], float]:
    """A copy of `dense` without the evenly spaced layers (never layer 0) whose removal brings its
    FLOPs per token closest to `target_ratio` of the dense model's."""
    table = flops_table(dense)
    full = sequence_flops(table, seq_len)
    layers = len(table["layers"])
    best = None
    for n in range(1, layers):
        drop = sorted({round(1 + i * (layers - 1) / n) for i in range(n)} - {0, layers})[:n]
        drop = [i for i in drop if 0 < i < layers]
        ratio = sequence_flops(table, seq_len, {i: 0 for i in drop}) / full
        if best is None or abs(ratio - target_ratio) < abs(best[2] - target_ratio):
            best = (n, drop, ratio)
    _, drop, ratio = best
    return remove_layers(dense, drop), drop, ratio


def ideal_ratio(dense: nn.Module, kept_fraction: float, seq_len: int) -> float:
    """FLOPs per token relative to dense when every other layer (from 1) keeps `kept_fraction` of
    the tokens, plus a one-row linear router per MoD layer."""
    table = flops_table(dense)
    layers = range(1, len(table["layers"]), 2)
    kept = {i: kept_count(kept_fraction, seq_len) for i in layers}
    for i in layers:
        table["layers"][i]["router"] = dense.config.hidden_size
    return sequence_flops(table, seq_len, kept) / sequence_flops(table, seq_len)


def dense_record(dense: nn.Module, valid_blocks: torch.Tensor, args: argparse.Namespace, **extra) -> dict:
    result = evaluate(dense, valid_blocks, batch_size=args.batch_size)
    return {
        "variant": "dense",
        "router": "dense",
        "arguments": "",
        "valid_ppl": result["ppl"],
        "valid_ppl_before": None,
        "flops_ratio": 1.0,
        "kept_fraction": 1.0,
        "parameters": sum(p.numel() for p in dense.parameters()),
        **extra,
    }


def topk_routing_ppl(model: nn.Module, blocks: torch.Tensor, args: argparse.Namespace) -> float:
    """Perplexity of an adapted model routed by top-k in eval mode as in training: how much of the
    gap to dense is the causal rule's (which decides each token alone) rather than the router's."""
    from modadapt.mod_layer import state_of

    config = state_of(model).config
    config.inference_routing = "topk"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    device = next(model.parameters()).device
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            return evaluate(model, blocks, batch_size=args.batch_size)["ppl"]
    finally:
        config.inference_routing = "causal"


def round_to_bf16(model: nn.Module) -> None:
    """Round the weights to bf16 in place, so a later process that loads the bf16 files we save
    continues from exactly these weights."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16))


def save_pretrained(dense: nn.Module, directory: Path, record: dict) -> None:
    """bf16 safetensors in shards of at most 15 MB (the GPU machine returns files of <= 16 MiB)."""
    dense.to(torch.bfloat16).save_pretrained(str(directory), max_shard_size="15MB")
    dense.float()
    (directory / "dense_record.json").write_text(json.dumps(record, indent=2) + "\n")


def load_pretrained(directory: Path) -> tuple[nn.Module, dict]:
    """The dense model `save_pretrained` wrote (its class from its config: mode_quality.py's Mixtral too)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa")
    record_file = directory / "dense_record.json"
    return model, json.loads(record_file.read_text()) if record_file.is_file() else {}


def adapt_variant(
    args: argparse.Namespace,
    output: Path,
    model: nn.Module,
    files: tuple[str, str],
    device: torch.device,
    teacher: nn.Module | None = None,
    **routing,
) -> dict:
    """One variant's adaptation: the lm-adapt recipe with the benchmark's budget (steps, batch,
    learning rate, what trains, data order) in a fresh run directory `output`; its summary.
    `model` is trained in place (converted with `routing` unless it is converted already);
    `teacher`, with `--distill`, the model it distills from (default: its starting weights)."""
    import shutil

    cfg = LMAdaptConfig(
        data=files[0],
        valid_data=files[1],
        output=str(output),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.adapt_steps,
        lr=args.adapt_lr,
        train=args.train,
        distill=args.distill,
        mixed_precision=args.mixed_precision,
        cpu=device.type == "cpu",
        max_eval_blocks=args.max_eval_blocks,
        eval_batch_size=args.batch_size,
        progress=not args.tiny,
        seed=args.seed,
        **routing,
    )
    shutil.rmtree(cfg.output, ignore_errors=True)
    return run(cfg, model=model, teacher=teacher)


# A model with nothing to route goes through the same recipe as a converted one (same optimizer,
# schedule and data), unconverted. (Until 2026-12-03: converted with `random` at capacity 1.0 on
# layer 1, exactly the dense layer; the tiny benchmark gives both the same perplexities to the bit.)
EXACTLY_DENSE = {"router": NO_ROUTER}


# --- goals of issue 7 ------------------------------------------------------------------------------
LEARNED = ("topk", "threshold-p", "attention")
FLOPS_TOLERANCE = 0.03  # "matched FLOPs" without a bracketing pair: the nearest run within this


def baseline_ppl(records: list[dict], kind: str, flops: float, key: str = "router") -> tuple[float, str, bool] | None:
    """(perplexity, how it was found, whether it is at matched FLOPs) of a baseline at `flops`:
    linear between its runs (`r[key] == kind`; and dense-adapt at 1.0) that bracket it, or its
    nearest run within FLOPS_TOLERANCE. Layer dropping only comes in whole layers (0.50 or 0.63 of
    dense here), so a router at 0.56 is compared with the line between. None when the baseline
    never ran."""
    points = sorted((r["flops_ratio"], r["valid_ppl"]) for r in records if r.get(key) == kind)
    points += [(1.0, r["valid_ppl"]) for r in records if r["variant"] == "dense-adapt"]
    if not any(r.get(key) == kind for r in records):
        return None
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f0 <= flops <= f1 and f1 > f0:
            return p0 + (flops - f0) / (f1 - f0) * (p1 - p0), f"interpolated between FLOPs {f0:.3f} and {f1:.3f}", True
    nearest = min(points, key=lambda point: abs(point[0] - flops))
    if abs(nearest[0] - flops) <= FLOPS_TOLERANCE:
        return nearest[1], f"its run at FLOPs {nearest[0]:.3f}", True
    return nearest[1], "no baseline run near these FLOPs", False


def goals(records: list[dict]) -> list[tuple[str, str, bool]]:
    """(goal, what was measured, met) for each goal of the issue that the records can answer."""
    dense = next((r for r in records if r["variant"] == "dense"), None)
    out = []
    if dense is None:
        return out
    thresholds = [r for r in records if r["router"] == "threshold-p"]
    if thresholds:
        best = min(
            thresholds,
            key=lambda r: (r["valid_ppl"] > 1.03 * dense["valid_ppl"] or r["flops_ratio"] > 0.75, r["valid_ppl"]),
        )
        met = best["valid_ppl"] <= 1.03 * dense["valid_ppl"] and best["flops_ratio"] <= 0.75
        out.append(
            (
                "threshold-p within 3% of dense ppl at >= 25% fewer FLOPs",
                f"{best['variant']}: ppl {best['valid_ppl']:.3f} = {best['valid_ppl'] / dense['valid_ppl']:.3f} x dense, "
                f"FLOPs {best['flops_ratio']:.3f} x dense",
                met,
            )
        )
    for learned in (r for r in records if r["router"] in LEARNED):
        for kind in ("random", "layer-drop"):
            baseline = baseline_ppl(records, kind, learned["flops_ratio"])
            if baseline is None:
                continue
            ppl, how, matched = baseline
            out.append(
                (
                    f"{learned['variant']} beats {kind} at matched FLOPs",
                    f"ppl {learned['valid_ppl']:.3f} vs {ppl:.3f} at FLOPs {learned['flops_ratio']:.3f} ({how})",
                    matched and learned["valid_ppl"] < ppl,
                )
            )
    # Divergence: a non-finite perplexity, skipped (non-finite) steps, or ending above twice dense's.
    broken = [
        r["variant"]
        for r in records
        if not math.isfinite(r["valid_ppl"]) or r.get("skipped_steps", 0) or r["valid_ppl"] > 2 * dense["valid_ppl"]
    ]
    out.append(
        (
            "no NaN or divergence",
            "all runs finite, no skipped steps, ppl < 2 x dense"
            if not broken
            else f"non-finite, skipped steps or ppl > 2 x dense in {', '.join(broken)}",
            not broken,
        )
    )
    return out


def add_record(records: list, record: dict, summary: dict, began: float, command: str, order: list) -> dict:
    """`record` with what every adaptation run reports (from lm-adapt's `summary`), added to
    `records` in variant order; this benchmark's and `mode_quality.py`'s runs share it."""
    record.update(
        valid_ppl=summary["valid_ppl"]["converted_after"],
        skipped_steps=summary["skipped_steps"],
        final_train_loss=summary["final_train_loss"],
        step_time_s=summary["step_time_s"],
        wall_s=time.time() - began,
        command=command,
    )
    records.append(record)
    records.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    return record


def start_run(args: argparse.Namespace, known: list[str]):
    """What an adaptation benchmark's `main` sets up before its dense model (this one's and
    `mode_quality.py`'s): torch's threads, the work folder, the device, the corpus' files and
    validation blocks, the variants asked for (out of `known`), and an earlier call's records
    when appending. Returns `(work, device, (train_file, valid_file), valid_blocks, wanted, records)`."""
    if args.tiny:  # tiny matrices: one thread avoids oversubscription on a busy CPU (10-100x faster)
        torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    train_file, valid_file = text_files(args, work)
    valid_blocks = pack(tokenize(read_corpus(valid_file), None, VOCAB), args.seq_len, valid_file)
    if args.max_eval_blocks:  # the blocks lm-adapt evaluates the variants on
        valid_blocks = spread_blocks(valid_blocks, args.max_eval_blocks)
    wanted = known if args.variants == "all" else args.variants.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {known}")
    records = json.loads(args.out.read_text()) if args.append and args.out.is_file() else []
    return work, device, (train_file, valid_file), valid_blocks, wanted, records


def left_out(name: str, done: set, args: argparse.Namespace, start: float) -> bool:
    """Whether this call leaves variant `name` out, saying why: its record is there already
    (appending), or the run is past `--budget-s`."""
    if name in done:
        print(f"{name}: already in {args.out}, skipped", flush=True)
        return True
    if args.budget_s and time.time() - start > args.budget_s:
        print(f"{name}: not started, {time.time() - start:.0f}s > --budget-s {args.budget_s}", flush=True)
        return True
    return False


def write_records(records: list[dict], out: Path, title: str) -> list[str]:
    """Write `records` as JSON at `out`; return the opening of their Markdown table (written beside
    it by the caller): its title and the commands whose records it holds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    commands = list(dict.fromkeys(r["command"] for r in records if r.get("command")))
    return [f"# {title}", "", "Produced by:", "", *(f"    {command}" for command in commands), ""]


def cell(record: dict, key: str, spec: str = ".3f") -> str:
    """A table cell: `record[key]` formatted, or "-" where the run has none (the dense row)."""
    return format(record[key], spec) if record.get(key) is not None else "-"


def write(records: list[dict], out: Path, meta: dict) -> None:
    lines = [
        *write_records(records, out, f"LM quality: {meta['description']}"),
        "| variant | router | arguments | valid ppl | ppl before adapt | ppl, top-k routing | FLOPs / dense | "
        "kept fraction | skipped steps | adapt s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        before, wall, topk = cell(r, "valid_ppl_before"), cell(r, "wall_s", ".0f"), cell(r, "valid_ppl_topk_routing")
        lines.append(
            f"| {r['variant']} | {r['router']} | {r.get('arguments', '')} | {r['valid_ppl']:.3f} | {before} | {topk} | "
            f"{r['flops_ratio']:.3f} | {r['kept_fraction']:.3f} | {r.get('skipped_steps', 0)} | {wall} |"
        )
    lines += ["", "## Goals (issue 7)", "", "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {goal} | {measured} | {'yes' if met else '**no**'} |" for goal, measured, met in goals(records)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def variant_names(args: argparse.Namespace) -> list[str]:
    """Every variant in run order: the dense model given the same adaptation (what adaptation alone
    does to perplexity), the capacity level, then threshold-p and its matched baselines (which are
    sized from the threshold-p runs, so they come after them)."""
    names = ["dense-adapt", "topk", "attention", "random", "layer-drop"]
    names += [f"threshold-p-a{a}" for a in args.alphas.split(",")]
    return names + ["random-matched", "layer-drop-matched"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.time()
    known = variant_names(args)
    work, device, (train_file, valid_file), valid_blocks, wanted, records = start_run(args, known)
    done = {r["variant"] for r in records}
    if args.pretrained:
        dense, saved = load_pretrained(Path(args.pretrained))
        print(f"dense Llama loaded from {args.pretrained}", flush=True)
        if "dense" not in done:
            records.insert(
                0,
                dense_record(
                    dense.to(device).eval(), valid_blocks, args, pretrain_final_loss=saved.get("pretrain_final_loss")
                ),
            )
    else:
        train_blocks = pack(tokenize(read_corpus(train_file), None, VOCAB), args.seq_len, train_file)
        dense = build_dense(args)
        print(
            f"dense Llama: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters, "
            f"{len(train_blocks)} training blocks of {args.seq_len} bytes",
            flush=True,
        )
        losses = pretrain(dense, train_blocks, args, device)
        round_to_bf16(dense)
        record = dense_record(
            dense.eval(), valid_blocks, args, pretrain_final_loss=losses[-1], pretrain_s=time.time() - start
        )
        records = [record] + [r for r in records if r["variant"] != "dense"]
        if args.save_pretrained:
            save_pretrained(dense, Path(args.save_pretrained), record)
    dense.to("cpu").eval()
    command = "python benchmarks/lm_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records[0].setdefault("command", command)
    meta = {
        "description": f"Llama {dense.config.num_hidden_layers}x{dense.config.hidden_size}, byte-level, "
        f"{args.adapt_steps} adaptation steps (train: {args.train})"
    }
    order = ["dense", *known]  # records of a run split over calls stay in run order
    write(records, args.out, meta)
    layers = dense.config.num_hidden_layers

    def adapt(name: str, model: nn.Module, **routing) -> dict:
        # a layer-dropped model distills from the dense one, not from its own starting weights
        teacher = copy.deepcopy(dense) if args.distill > 0 else None
        return adapt_variant(args, work / name, model, (train_file, valid_file), device, teacher=teacher, **routing)

    def thresholds() -> list[dict]:
        return [r for r in records if r["router"] == "threshold-p"]

    def spec(name: str) -> dict:
        """What to run for a variant: a conversion, or a FLOPs ratio for layer dropping."""
        if name in ("topk", "attention", "random"):
            return dict(router=name, capacity=args.capacity, layers="every-other")
        if name.startswith("threshold-p-a"):
            kwargs = {"alpha": float(name.removeprefix("threshold-p-a")), "target": args.target}
            return dict(router="threshold-p", router_kwargs=kwargs, layers="every-other")
        if name == "random-matched":  # random at the kept fraction threshold-p reached (its target if none ran)
            kept = [r["kept_fraction"] for r in thresholds()]
            capacity = max(round(sum(kept) / len(kept), 3), 1 / args.seq_len) if kept else args.target
            return dict(router="random", capacity=capacity, layers="every-other")
        ratio = (
            ideal_ratio(dense, args.capacity, args.seq_len)
            if name == "layer-drop"
            else sum(r["flops_ratio"] for r in thresholds()) / len(thresholds())
            if thresholds()
            else ideal_ratio(dense, args.target, args.seq_len)
        )
        return dict(target_flops_ratio=ratio)

    for name in wanted:
        if left_out(name, done, args, start):
            continue
        began = time.time()
        if name == "dense-adapt":
            summary = adapt(name, copy.deepcopy(dense), **EXACTLY_DENSE)
            record = {
                "router": "dense",
                "arguments": "",
                "flops_ratio": 1.0,
                "kept_fraction": 1.0,
                "valid_ppl_before": summary["valid_ppl"]["dense"],
            }
        elif "target_flops_ratio" in (routing := spec(name)):
            dropped, drop, ratio = drop_layers(dense, routing["target_flops_ratio"], args.seq_len)
            summary = adapt(name, dropped, **EXACTLY_DENSE)
            record = {
                "router": "layer-drop",
                "arguments": json.dumps({"dropped_layers": drop}),
                "flops_ratio": ratio,
                "valid_ppl_before": summary["valid_ppl"]["dense"],
                "kept_fraction": (layers - len(drop)) / layers,
                "target_flops_ratio": routing["target_flops_ratio"],
            }
        else:
            model = copy.deepcopy(dense)
            summary = adapt(name, model, **routing)
            kept = summary["kept_fraction"]["after"]
            arguments = routing.get("router_kwargs") or {"capacity": routing["capacity"]}
            record = {
                "router": routing["router"],
                "arguments": json.dumps(arguments),
                "valid_ppl_before": summary["valid_ppl"]["converted_before"],
                "flops_ratio": summary["flops_ratio"],
                "kept_fraction": sum(kept.values()) / len(kept),
                "kept_fraction_per_layer": kept,
            }
            if "capacity" in routing:  # also the training-time top-k (not causal: perplexity only)
                record["valid_ppl_topk_routing"] = topk_routing_ppl(model, valid_blocks, args)
        record = add_record(records, {"variant": name, **record}, summary, began, command, order)
        write(records, args.out, meta)
        print(
            f"{name}: valid ppl {record['valid_ppl']:.3f}, FLOPs ratio {record['flops_ratio']:.3f}, "
            f"kept {record['kept_fraction']:.3f}, {record['wall_s']:.0f}s",
            flush=True,
        )
    for goal, measured, met in goals(records):
        print(f"goal: {goal}: {measured} -> {'met' if met else 'NOT met'}", flush=True)
    print(f"{time.time() - start:.0f}s in all; records in {args.out}", flush=True)
    return records


if __name__ == "__main__":
    main()
