"""The `modadapt` command line: parses, calls the public API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PACKING, SCOPES, ModConfig, field_help, pack_reserve_value
from .deprecation import moved_names
from .errors import ModAdaptError

# The CLI imports what it uses inside its commands, so that these old names go through the alias.
__getattr__ = moved_names(
    __name__,
    {
        "TOKENIZER_FILES": "modadapt.sources:TOKENIZER_FILES",
        "is_causal_lm": "modadapt.sources:is_causal_lm",
        "load_source_model": "modadapt.sources:load_source_model",
        "parse_router_args": "modadapt.config:parse_router_args",
    },
)


def load_config_file(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ModAdaptError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ModAdaptError(f"config file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModAdaptError(f"config file {path} must hold a mapping of ModConfig fields.")
    return data.get("mod_config", data)


#: The ModConfig fields `modadapt convert` takes as flags of their own (the rest from `-c FILE`).
CONVERT_FIELDS = (
    "router",
    "layers",
    "capacity",
    "inference_routing",
    "packing",
    "scope",
    "pack_bucket",
    "pack_reserve",
)


def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert, save
    from .config import parse_router_args
    from .output_dir import check_output
    from .persistence import META_FILE
    from .plugins import get_router
    from .sources import load_model

    fields = load_config_file(args.config) if args.config else {}
    for name in CONVERT_FIELDS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.router_arg:
        fields["router_kwargs"] = {**fields.get("router_kwargs", {}), **parse_router_args(args.router_arg)}
    if args.adapter_arg:
        fields["adapter_kwargs"] = {
            **fields.get("adapter_kwargs", {}),
            **parse_router_args(args.adapter_arg, "--adapter-arg"),
        }
    config = ModConfig.from_dict(fields)
    router_cls = get_router(config.router).obj
    if args.capacity is not None and not router_cls.capacity_based:
        raise ModAdaptError(
            f"router {config.router!r} decides by its own threshold and takes no --capacity; "
            f"see its arguments with `modadapt list routers`."
        )
    out = check_output(args.output, args.overwrite, META_FILE)
    source = load_model(args.model, converted=False)
    model, extras = source.model, source.files
    before = sum(p.numel() for p in model.parameters())
    convert(model, config, adapter=args.adapter)
    added = sum(p.numel() for p in model.parameters()) - before
    save(model, out, overwrite=args.overwrite, extra_files=extras)
    from .mod_layer import state_of

    state = state_of(model)
    print(f"converted {args.model}: router {config.router}, layers {state.layer_indices}", end="")
    print(f", capacity {config.capacity}" if router_cls.capacity_based else "", end="")
    print(f", router args {config.router_kwargs}" if config.router_kwargs else "")
    print(f"parameters: {before:,} dense + {added:,} router = {before + added:,}")
    print(f"saved to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Convert a preset, generate with the KV cache, check it against a full forward, show routing."""
    import torch

    from . import build_preset, convert, mod_layers, routing_stats, save
    from .output_dir import check_output
    from .persistence import META_FILE
    from .sources import is_causal_lm

    if args.output:  # refused before the work, not after it
        check_output(args.output, args.overwrite, META_FILE)
    model = build_preset(args.preset)
    if not is_causal_lm(model):
        raise ModAdaptError(
            f"demo generates text with a causal language model; preset {args.preset} is a "
            f"{type(model).__name__}. Use a text preset (e.g. tiny-llama), or `modadapt convert "
            f"{args.preset} -o DIR` to convert it."
        )
    convert(model, router=args.router, capacity=args.capacity, layers="every-other")
    generator = torch.Generator().manual_seed(0)
    for layer in mod_layers(model):  # a fresh router keeps every token; give it opinions
        for name, param in layer.router.named_parameters():
            param.data = (
                torch.zeros_like(param) if name.endswith("bias") else torch.randn(param.shape, generator=generator)
            )
    prompt = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        full = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    cached = torch.stack(out.logits, dim=1)
    error = (cached - full).abs().max().item()
    print(f"{args.preset} -> MoD ({args.router}, layers {[layer.mod_state.index for layer in mod_layers(model)]})")
    print(f"generated {out.sequences.shape[1] - prompt.shape[1]} tokens x {prompt.shape[0]} rows with the KV cache")
    print(f"max |cached - full recompute| logit difference: {error:.2e}")
    for row in routing_stats(model):
        print(f"  layer {row['layer']}: kept {row['kept_tokens']}/{row['tokens']} tokens of the last forward")
    if args.output:
        save(model, args.output, overwrite=args.overwrite)
        print(f"saved to {args.output}")
    return 0 if error < 1e-4 else 1


def saved_model_path(model: str) -> Path:
    """MODEL as a saved model's directory: itself, or a recipe run directory's `model/`."""
    from .persistence import META_FILE

    path = Path(model)
    if not (path / META_FILE).is_file() and (path / "model" / META_FILE).is_file():
        return path / "model"
    return path


def check_windows(args: argparse.Namespace) -> None:
    """`--samples`, `--seq-len` and `--batch-size` of the commands that read text windows."""
    for name, value, low in (
        ("--samples", args.samples, 1),
        ("--seq-len", args.seq_len, 2),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise ModAdaptError(f"{name} must be at least {low}, got {value}.")


def warn_if_windows_overlap(args: argparse.Namespace, text_tokens: int) -> None:
    if text_tokens < args.samples * args.seq_len:
        print(
            f"modadapt: warning: the text has {text_tokens} tokens, fewer than --samples {args.samples} x "
            f"--seq-len {args.seq_len}: the windows overlap; give more text for independent samples.",
            file=sys.stderr,
        )


def cmd_analyze(args: argparse.Namespace) -> int:
    """Score every layer on calibration data, select layers to convert, write the report."""
    from .metrics.calibration import (
        calibration_kind,
        image_batches,
        image_tokens,
        read_text,
        text_batches,
    )
    from .metrics.report import analyze, write_report
    from .metrics.selection import REPORT_FILE, parse_rule
    from .output_dir import check_output
    from .plugins import get_router
    from .presets import preset_names
    from .recipes.lm_adapt import check_seq_len
    from .sources import load_model

    rule = parse_rule(args.select)
    check_windows(args)
    if args.tol is not None and not args.tol >= 0:
        raise ModAdaptError(f"--tol must be a tolerance >= 0, got {args.tol}.")
    ModConfig(router=args.router, capacity=args.capacity)
    get_router(args.router)
    check_output(Path(args.output), args.overwrite, REPORT_FILE)
    if args.data is None and args.model not in preset_names():
        raise ModAdaptError("--data is required for a model directory; the built-in text is for the presets.")
    source = load_model(args.model, converted=False)
    model = source.model
    kind = calibration_kind(model)
    if kind == "text":
        text, data_path, digest = read_text(args.data)
        tokenizer = source.tokenizer
        batches, text_tokens = text_batches(
            text,
            tokenizer=tokenizer,
            vocab_size=model.config.vocab_size,
            samples=args.samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        tokens = args.seq_len
        check_seq_len(model, tokens)
        data = {
            "path": data_path,
            "sha256": digest,
            "tokenizer": "model" if tokenizer is not None else "bytes",
            "samples": args.samples,
            "seq_len": tokens,
            "text_tokens": text_tokens,
        }
        warn_if_windows_overlap(args, text_tokens)
    elif kind == "llava":  # images + prompts
        from .recipes.llava_adapt import calibration_batches

        batches, data_path, digest = calibration_batches(
            args.data, model, samples=args.samples, batch_size=args.batch_size, seed=args.seed
        )
        tokens = round(sum(int(b["attention_mask"].sum()) for b in batches) / sum(len(b["input_ids"]) for b in batches))
        data = {"path": data_path, "sha256": digest, "kind": "llava", "samples": args.samples, "seq_len": tokens}
    elif kind == "images":
        batches, data_path, digest = image_batches(
            args.data, model, samples=args.samples, batch_size=args.batch_size, seed=args.seed
        )
        tokens = image_tokens(model)
        data = {
            "path": data_path,
            "sha256": digest,
            "kind": "images",
            "samples": sum(len(b) for b in batches),
            "seq_len": tokens,
        }
    else:
        raise ModAdaptError(
            f"{args.model}: `analyze` reads text for language models, images for timm ViTs and "
            "LLaVA-format JSON for LLaVA models."
        )
    report = analyze(
        model,
        batches,
        model_name=args.model,
        data=data,
        seed=args.seed,
        metric=args.metric,
        rule=rule,
        capacity=args.capacity,
        router=args.router,
        tokens=tokens,
        output=args.output,
        tol=args.tol,
        progress=not args.quiet,
    )
    write_report(report, args.output, overwrite=args.overwrite)
    if report["tie"]:
        print(f"modadapt: warning: {report['tie']}", file=sys.stderr)
    for row in report["layers"]:
        mark = "  selected" if row["selected"] else ""
        print(f"layer {row['layer']}: {args.metric} {row['mean']:.4f} +- {row['std']:.4f}{mark}")
    print(f"selected layers {report['selected_layers']} ({args.select}); report in {args.output}")
    print(f"convert: {report['convert_command']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Set a saved language model's calibrated causal cut-offs for inference routing on text
    (`modadapt.calibrate_cutoffs`) and save the model to a new directory."""
    from . import calibrate_cutoffs, mod_layers, save
    from .cutoffs import calibrates
    from .metrics.calibration import calibration_kind, read_text, text_batches
    from .output_dir import check_output
    from .persistence import META_FILE
    from .recipes.lm_adapt import check_seq_len
    from .recipes.training import eval_device
    from .sources import load_model

    check_windows(args)
    device = eval_device(args.device)
    path = saved_model_path(args.model)
    if not (path / META_FILE).is_file():
        raise ModAdaptError(f"{args.model} is not a converted model (no {META_FILE}); convert and train it first.")
    out = check_output(args.output, args.overwrite, META_FILE)
    source = load_model(str(path))
    model = source.model
    if calibration_kind(model) != "text":
        raise ModAdaptError(
            f"{args.model}: `calibrate` reads text for language models; a ViT keeps its top-k at inference "
            "(nothing to calibrate), and a LLaVA model's cut-offs are set by modadapt.calibrate_cutoffs in Python."
        )
    check_seq_len(model, args.seq_len)
    text, _, _ = read_text(args.data)
    batches, text_tokens = text_batches(
        text,
        tokenizer=source.tokenizer,
        vocab_size=model.config.vocab_size,
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    warn_if_windows_overlap(args, text_tokens)
    layers = {layer.mod_state.index: layer.router for layer in mod_layers(model)}
    before = {i: float(r.causal_threshold(i)) for i, r in layers.items() if calibrates(r)}
    found = calibrate_cutoffs(model.to(device), batches, progress=not args.quiet)
    save(model.cpu(), out, overwrite=args.overwrite, extra_files=source.files)
    for index, cut in found.items():
        print(f"layer {index}: cut-off {before[index]:.6g} -> {cut:.6g}")
    print(f"set on {args.samples} windows of {args.seq_len} tokens; saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a saved language model on text, top-1 of a ViT on images, answer accuracy of
    a LLaVA model on LLaVA-format JSON (or of their dense originals)."""
    from .persistence import META_FILE, read_meta
    from .recipes.config import run_setting

    path = saved_model_path(args.model)
    adapter = read_meta(path)["adapter"] if (path / META_FILE).is_file() else None
    common = dict(dense=args.dense, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    if adapter in ("timm-vit", "llava"):
        given = [flag for flag, value in (("--seq-len", args.seq_len), ("--max-tokens", args.max_tokens)) if value]
        if given:
            raise ModAdaptError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to language "
                f"models; {args.model} is a {adapter} model."
            )
    if adapter != "llava" and args.max_new_tokens:
        raise ModAdaptError(f"--max-new-tokens applies only to LLaVA models; {args.model} is not one.")
    if adapter == "timm-vit":
        from .recipes.vit_imagenet import evaluate_saved

        result = evaluate_saved(str(path), args.data, **common)
        summary = (
            f"{result['model']} top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f} (loss {result['loss']:.4f}, "
            f"{result['images']} images of split {result['split']})"
        )
    elif adapter == "llava":
        from .recipes.llava_adapt import evaluate_saved

        tokens = args.max_new_tokens or run_setting(path.parent, "max_new_tokens") or 8
        result = evaluate_saved(str(path), args.data, max_new_tokens=tokens, **common)
        summary = f"{result['model']} accuracy {result['accuracy']:.4f} (loss {result['loss']:.4f}, {result['samples']} samples)"
    else:
        from .recipes.lm_adapt import evaluate_saved

        result = evaluate_saved(args.model, args.data, seq_len=args.seq_len, max_tokens=args.max_tokens, **common)
        summary = (
            f"{result['model']} perplexity {result['ppl']:.4f} (loss {result['loss']:.4f}, {result['tokens']} "
            f"tokens, {result['blocks']} blocks of {result['seq_len']})"
        )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(summary)
    for layer, fraction in result["kept_fraction"].items():
        print(f"  layer {layer}: kept fraction {fraction:.4f}")
    if "flops_ratio" in result:
        print(f"FLOPs per token: {result['flops_per_token']:.4g} ({result['flops_ratio']:.3f} of dense)")
    if "prune" in result:
        from .prune import describe

        print(f"pruned: {describe(result['prune'])}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete whole layers of a causal LM and save it as a plain transformers model (`modadapt.prune`)."""
    from .output_dir import check_output
    from .persistence import META_FILE
    from .prune import PRUNE_FILE, describe, prune_with_record, save_pruned
    from .sources import load_model

    if args.seq_len < 1:
        raise ModAdaptError(f"--seq-len must be at least 1, got {args.seq_len}.")
    if (Path(args.model) / META_FILE).is_file():
        raise ModAdaptError(f"{args.model} is a converted model; prune its original (the dense model).")
    if Path(args.output).resolve() == Path(args.model).resolve():
        raise ModAdaptError("-o is MODEL itself; write the pruned model to a new directory.")
    out = check_output(args.output, args.overwrite, PRUNE_FILE)  # refused before the work
    source = load_model(args.model, converted=False)
    seed = 0 if source.path is None else None  # a preset is built with seed 0 (a teacher must be too)
    record = prune_with_record(
        source.model, args.layers, source=args.model, flops=args.flops, seq_len=args.seq_len, seed=seed
    )
    save_pruned(source.model, out, record, overwrite=args.overwrite, extra_files=source.files)
    layers, params = record["num_layers"], record["parameters"]
    print(f"pruned {describe(record)} ({args.seq_len} tokens)")
    print(
        f"{layers['after']} of {layers['before']} layers stay; parameters {params['before']:,} -> {params['after']:,}"
    )
    print(
        f"saved to {out}; heal it: modadapt train lm-adapt --model {out} --router none --train all "
        f"--teacher {record.get('original', args.model)} --data TEXT -o RUN"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .plugins import registry
    from .routers.options import describe_options, option_defaults

    kind = args.what.rstrip("s")
    rows = []
    for entry in registry().list(kind):
        row = entry.as_dict()
        if kind == "router":
            row["arguments"] = option_defaults(entry.obj.Options)  # None spelt as its label, e.g. calibrated
            row["options"] = describe_options(entry.obj.Options)
            row["capacity_based"] = entry.obj.capacity_based
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<14} {row['provider']:<16} {row['summary']}")
        for opt in row.get("options", ()):
            allowed = f"; {opt['allowed']}" if opt["allowed"] else ""
            default = str(opt["default"]).lower() if isinstance(opt["default"], bool) else opt["default"]
            print(f"    {opt['name']}={default} ({opt['type']}{allowed}): {opt['help']}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import registry

    rows = registry().plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<28} {row['provider']:<16} {', '.join(row['hooks'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modadapt", description="Convert existing transformers into Mixture-of-Depths models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model and save it to a new directory")
    p.add_argument("model", help="local transformers model directory, or a preset such as tiny-llama")
    p.add_argument("-o", "--output", required=True, help="directory to write (must be new or empty)")
    p.add_argument("-c", "--config", help="YAML/JSON file of ModConfig fields; flags override it")
    p.add_argument("--router", help=field_help("router"))
    p.add_argument("--capacity", type=float, help=field_help("capacity"))
    p.add_argument("--layers", help=field_help("layers"))
    p.add_argument("--inference-routing", dest="inference_routing", help=field_help("inference_routing"))
    p.add_argument("--packing", choices=PACKING, help=field_help("packing"))
    p.add_argument("--scope", choices=SCOPES, help=field_help("scope"))
    p.add_argument("--pack-bucket", dest="pack_bucket", type=int, metavar="N", help=field_help("pack_bucket"))
    p.add_argument(
        "--pack-reserve",
        dest="pack_reserve",
        type=pack_reserve_value,
        metavar="SHARE|auto",
        help=field_help("pack_reserve"),
    )
    p.add_argument("--router-arg", action="append", default=[], metavar="KEY=VALUE", help=field_help("router_kwargs"))
    p.add_argument("--adapter-arg", action="append", default=[], metavar="KEY=VALUE", help=field_help("adapter_kwargs"))
    p.add_argument(
        "--adapter",
        help="registered adapter to convert with, when several claim the model "
        "(default: the one that does; see `modadapt list adapters`)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output directory modadapt wrote before")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="convert a preset, generate with the cache and check it (offline)")
    p.add_argument(
        "--preset", default="tiny-llama", help="preset model (default: tiny-llama; see `modadapt list presets`)"
    )
    p.add_argument("--router", default="threshold-p", help=field_help("router"))
    p.add_argument("--capacity", type=float, default=0.5, help=field_help("capacity"))
    p.add_argument("-o", "--output", help="also save the converted model here")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory modadapt wrote before")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="score layers (ARank or cosine) and pick the ones to convert")
    p.add_argument("model", help="local transformers model directory, or a preset such as tiny-llama")
    p.add_argument("-o", "--output", required=True, help="report directory to write (must be new or empty)")
    p.add_argument(
        "--data",
        help="text models: local .txt/.jsonl file or directory (optionally .gz); timm ViTs: a "
        "folder of images; LLaVA: a LLaVA-format JSON file; presets default to built-in data",
    )
    p.add_argument("--samples", type=int, default=32, help="number of calibration sequences (default: 32)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="sequences per forward (default: 8)")
    p.add_argument(
        "--metric", choices=["arank", "cosine"], default="arank", help="layer-redundancy metric (default: arank)"
    )
    p.add_argument("--tol", type=float, help="ARank: absolute singular-value tolerance (default: matrix_rank's own)")
    p.add_argument(
        "--select", default="fraction=0.5", help="fraction=F, count=K or threshold=X (default: fraction=0.5)"
    )
    p.add_argument("--capacity", type=float, default=0.125, help=field_help("capacity"))
    p.add_argument("--router", default="topk", help=field_help("router"))
    p.add_argument("--seed", type=int, default=0, help="seed that picks the calibration windows (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a report directory modadapt wrote before")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "calibrate",
        help="set a trained language model's causal cut-offs for inference routing on text, save it anew",
    )
    p.add_argument(
        "model", help="directory written by modadapt.save or `modadapt convert`, or a recipe's run directory"
    )
    p.add_argument("--data", required=True, help="local .txt/.jsonl file or directory (optionally .gz) of held-in text")
    p.add_argument("-o", "--output", required=True, help="directory to write (must be new or empty)")
    p.add_argument("--samples", type=int, default=32, help="windows of text to calibrate on (default: 32)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="windows per forward (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed that picks the windows (default: 0)")
    p.add_argument("--device", help="device to run on (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory modadapt wrote before")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity (LMs), top-1 (ViTs) or answer accuracy (LLaVA) of a saved model")
    p.add_argument(
        "model", help="directory written by `modadapt convert` or modadapt.save, or a recipe's run directory"
    )
    p.add_argument(
        "--data",
        required=True,
        help="language models: local .txt/.jsonl file or directory (optionally "
        ".gz), or datasets files; timm ViTs: an image folder (its validation split); LLaVA: LLaVA-format JSON",
    )
    p.add_argument(
        "--seq-len",
        dest="seq_len",
        type=int,
        help="tokens per block (default: the run's own for an lm-adapt run's model, else 256)",
    )
    p.add_argument("--device", help="device to evaluate on (default: cuda when available, else cpu)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=0, help="use at most this many tokens (0: all)")
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=8,
        help="blocks, images or samples per forward (default: 8)",
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        help="LLaVA: answer length limit (default: the run's own, else 8)",
    )
    p.add_argument("--dense", action="store_true", help="evaluate the dense model (routers removed) instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "prune",
        help="delete whole layers of a language model (the static baseline), save it as a transformers model",
        description="Delete whole layers of a causal LM and save it as a plain transformers model with its "
        "tokenizer and prune.json (what was deleted, FLOPs). Heal it with `modadapt train lm-adapt --model OUT "
        "--router none --train all --teacher MODEL`: at the quality benchmark's scale that beats MoD routing "
        "at the same FLOPs (benchmarks/README.md).",
    )
    p.add_argument("model", help="local transformers model directory, or a preset such as tiny-llama")
    p.add_argument("-o", "--output", required=True, help="directory to write (must be new or empty)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--layers",
        help="layers to delete, as --layers names them for convert: 'evenly:N' (N evenly spaced), "
        "'2,5,7,10', or 'from:REPORT_DIR' (the most redundant by `modadapt analyze`; --metric cosine "
        "is ShortGPT's choice). Layer 0 always stays",
    )
    which.add_argument(
        "--flops",
        type=float,
        metavar="SHARE",
        help="delete the evenly spaced layers whose count brings FLOPs per token nearest SHARE of the "
        "original's (e.g. 0.7)",
    )
    p.add_argument(
        "--seq-len",
        dest="seq_len",
        type=int,
        default=256,
        help="tokens the FLOPs per token are counted at (default: 256)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output directory modadapt prune wrote before")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("list", help="list installed routers, adapters, presets or recipes")
    p.add_argument("what", choices=["routers", "adapters", "presets", "recipes"])
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("plugins", help="list loaded plugins and the hooks they implement")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_plugins)

    from .plugins import registry

    p = sub.add_parser(
        "train",
        help="fine-tune a converted model with a recipe (see `modadapt list recipes`)",
        description="Fine-tune a converted model with a recipe. Several processes (batch sizes are per process): "
        "`accelerate launch --multi_gpu --num_processes N -m modadapt.cli train RECIPE ...` (DDP; add "
        "the recipe's --cpu on a CPU machine) or `torchrun --nproc_per_node N -m modadapt.cli train "
        "RECIPE ...`; lm-adapt also with FSDP2: `accelerate launch --use_fsdp --fsdp_version 2 "
        '--num_processes N -m modadapt.cli train lm-adapt ...`. See docs/recipes.md, "Several processes".',
    )
    recipes = p.add_subparsers(dest="recipe", required=True)
    for entry in registry().list("recipe"):
        recipe = entry.obj
        description = recipe.description
        r = recipes.add_parser(
            entry.name,
            help=description.splitlines()[0] if description else None,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        recipe.add_arguments(r)
        r.set_defaults(func=recipe.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser loads the plugins: their errors and a Ctrl-C there are one line too
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ModAdaptError as exc:
        print(f"modadapt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a recipe's `Interrupted` says how to resume
        from .recipes.training import launched_rank

        if launched_rank() == 0:  # several processes stop together: the first one says so
            print(f"modadapt: {exc or 'interrupted.'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
