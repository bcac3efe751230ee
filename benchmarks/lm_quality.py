"""Quality benchmark on real text: do converted LMs keep their quality at fewer FLOPs? (issue 7)

1. Pretrain a small Llama (byte-level vocabulary of 256) dense from scratch on the training split
   of ``python-docs-3.11``: the "pretrained" model.
2. Convert copies of it (every other layer from layer 1) with ``topk`` (12.5%), ``threshold-p``
   (several alpha), ``attention`` (12.5%) and ``random`` (12.5%); build a static layer-dropping
   baseline by deleting evenly spaced layers until its FLOPs per token match ``topk``'s ideal ones.
3. Adapt each with the same budget through the `lm-adapt` recipe's Python API
   (`modadapt.recipes.lm_adapt.run`): same steps, batch, learning rate, data order, what trains.
4. Write records (``router``, ``valid_ppl``, ``flops_ratio`` = MoD / dense FLOPs per token,
   ``kept_fraction``, ...) to ``--out`` after every variant, and a Markdown table next to it.

The layer-dropped model has no router to train; it goes through the same recipe as a converted
model whose one MoD layer keeps every token (the ``random`` router at capacity 1.0: no parameters,
no cost, exactly the dense layer), so it gets the same optimizer, schedule and data.

    python benchmarks/lm_quality.py --tiny                      # CPU smoke test, < 1 minute
    python benchmarks/lm_quality.py --mixed-precision bf16      # GPU: the real run
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modadapt.recipes.lm_adapt import (LMAdaptConfig, evaluate, flops_table, pack, read_corpus, run,
                                       sequence_flops, tokenize)
from modadapt.routers.base import kept_count

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "python-docs-3.11"
VOCAB = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="directory with train.txt.gz and valid.txt.gz")
    p.add_argument("--out", help="JSON records (default: benchmarks/results/lm_quality.json; --tiny: WORK/lm_quality.json)")
    p.add_argument("--work", default="/tmp/modadapt-lm-quality", help="run directories and the pretrained model")
    p.add_argument("--tiny", action="store_true", help="tiny model and budget on a slice of the text (CPU smoke test)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--adapt-steps", type=int, default=500)
    p.add_argument("--adapt-lr", type=float, default=3e-4)
    p.add_argument("--train", default="all", choices=["routers", "lora", "all"],
                   help="what adaptation trains (routers: layer dropping, random and attention have nothing to train)")
    p.add_argument("--alphas", default="0.01,0.03,0.1", help="threshold-p load-reducing loss weights")
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight of the recipe")
    p.add_argument("--max-eval-blocks", type=int, default=0, help="cap the validation blocks (0: all)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.seq_len, args.batch_size = 32, 4, 4, 32, 8
        args.pretrain_steps, args.adapt_steps, args.max_eval_blocks = 20, 3, 8
        args.alphas = "0.01,0.1"
    args.out = Path(args.out) if args.out else (Path(args.work) / "lm_quality.json" if args.tiny
                                                 else ROOT / "results" / "lm_quality.json")
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

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 32 * 32 or 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(2048, args.seq_len),
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def pretrain(model: nn.Module, blocks: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Plain dense pretraining: AdamW, warm-up then cosine, bf16/fp16 autocast on GPU."""
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
            logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
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
    model = copy.deepcopy(dense)
    stack = model.model.layers
    kept = [layer for i, layer in enumerate(stack) if i not in drop]
    model.model.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    return model, drop, ratio


def ideal_topk_ratio(dense: nn.Module, capacity: float, seq_len: int) -> float:
    table = flops_table(dense)
    layers = range(1, len(table["layers"]), 2)
    kept = {i: kept_count(capacity, seq_len) for i in layers}
    hidden = dense.config.hidden_size
    for i in layers:  # topk's router: one linear score per token
        table["layers"][i]["router"] = hidden
    return sequence_flops(table, seq_len, kept) / sequence_flops(table, seq_len)


def write(records: list[dict], out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    lines = [f"# LM quality: {meta['description']}", "", f"Command: `{meta['command']}`", "",
             "| router | arguments | valid ppl | ppl before adapt | FLOPs / dense | kept fraction | skipped steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        before = f"{r['valid_ppl_before']:.3f}" if r.get("valid_ppl_before") is not None else "-"
        lines.append(f"| {r['router']} | {r.get('arguments', '')} | {r['valid_ppl']:.3f} | {before} | "
                     f"{r['flops_ratio']:.3f} | {r['kept_fraction']:.3f} | {r.get('skipped_steps', 0)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> list[dict]:
    import sys

    args = parse_args(argv)
    if args.tiny:  # tiny matrices: one thread avoids oversubscription on a busy CPU (10-100x faster)
        torch.set_num_threads(1)
    start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    train_file, valid_file = text_files(args, work)
    train_blocks = pack(tokenize(read_corpus(train_file), None, VOCAB), args.seq_len, train_file)
    valid_blocks = pack(tokenize(read_corpus(valid_file), None, VOCAB), args.seq_len, valid_file)
    if args.max_eval_blocks:
        valid_blocks = valid_blocks[: args.max_eval_blocks]

    dense = build_dense(args)
    print(f"dense Llama: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_blocks)} training blocks of {args.seq_len} bytes", flush=True)
    losses = pretrain(dense, train_blocks, args, device)
    dense.eval()
    dense_eval = evaluate(dense, valid_blocks, batch_size=args.batch_size)
    meta = {"description": f"Llama {args.layers}x{args.hidden}, byte-level, {args.pretrain_steps} pretraining "
                           f"steps, {args.adapt_steps} adaptation steps (train: {args.train})",
            "command": "python benchmarks/lm_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    records = [{"router": "dense", "arguments": "", "valid_ppl": dense_eval["ppl"], "valid_ppl_before": None,
                "flops_ratio": 1.0, "kept_fraction": 1.0, "pretrain_final_loss": losses[-1],
                "parameters": sum(p.numel() for p in dense.parameters())}]
    write(records, args.out, meta)
    dense.to("cpu")

    def adapt(name: str, model: nn.Module, **routing) -> dict:
        cfg = LMAdaptConfig(
            data=train_file, valid_data=valid_file, output=str(work / name), seq_len=args.seq_len,
            batch_size=args.batch_size, max_steps=args.adapt_steps, lr=args.adapt_lr, train=args.train,
            distill=args.distill, mixed_precision=args.mixed_precision, cpu=device.type == "cpu",
            max_eval_blocks=args.max_eval_blocks, eval_batch_size=args.batch_size, progress=not args.tiny,
            seed=args.seed, **routing,
        )
        import shutil

        shutil.rmtree(cfg.output, ignore_errors=True)
        return run(cfg, model=model)

    capacity = args.capacity
    variants = [("topk", dict(router="topk", capacity=capacity)), ]
    variants += [(f"threshold-p-a{a}", dict(router="threshold-p", router_kwargs={"alpha": float(a)}))
                 for a in args.alphas.split(",")]
    variants += [("attention", dict(router="attention", capacity=capacity)),
                 ("random", dict(router="random", capacity=capacity))]
    for name, routing in variants:
        summary = adapt(name, copy.deepcopy(dense), layers="every-other", **routing)
        kept = summary["kept_fraction"]["after"]
        records.append({
            "router": routing["router"], "arguments": json.dumps(routing.get("router_kwargs", {"capacity": capacity})),
            "valid_ppl": summary["valid_ppl"]["converted_after"],
            "valid_ppl_before": summary["valid_ppl"]["converted_before"],
            "flops_ratio": summary["flops_ratio"], "kept_fraction": sum(kept.values()) / len(kept),
            "kept_fraction_per_layer": kept, "skipped_steps": summary["skipped_steps"],
            "final_train_loss": summary["final_train_loss"],
        })
        write(records, args.out, meta)
        print(f"{name}: valid ppl {records[-1]['valid_ppl']:.3f}, FLOPs ratio {records[-1]['flops_ratio']:.3f}, "
              f"kept {records[-1]['kept_fraction']:.3f}", flush=True)

    target = ideal_topk_ratio(dense, capacity, args.seq_len)
    dropped, drop, ratio = drop_layers(dense, target, args.seq_len)
    summary = adapt("layer-drop", dropped, router="random", capacity=1.0, layers=[1])
    records.append({
        "router": "layer-drop", "arguments": json.dumps({"dropped_layers": drop}),
        "valid_ppl": summary["valid_ppl"]["converted_after"], "valid_ppl_before": summary["valid_ppl"]["dense"],
        "flops_ratio": ratio, "kept_fraction": (args.layers - len(drop)) / args.layers,
        "skipped_steps": summary["skipped_steps"], "final_train_loss": summary["final_train_loss"],
        "target_flops_ratio": target,
    })
    write(records, args.out, meta)
    print(f"layer-drop {drop}: valid ppl {records[-1]['valid_ppl']:.3f}, FLOPs ratio {ratio:.3f} "
          f"(target {target:.3f}); {time.time() - start:.0f}s in all; records in {args.out}", flush=True)
    return records


if __name__ == "__main__":
    main()
