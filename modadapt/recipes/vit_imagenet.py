"""`vit-imagenet`: fine-tune a Mixture-of-Depths timm ViT on ImageNet-style data.

Data is read with `datasets`: an `imagefolder` directory (``train/<class>/*.png``,
``validation/<class>/*.png``), local parquet or arrow files in the Hugging Face ImageNet layout
(``image`` and ``label`` columns, split named by the file prefix: ``train-*.parquet``), or a
`save_to_disk` directory. Images go through timm's data config and transforms; `accelerate` gives
mixed precision and DDP on several processes, GPUs or CPU (``accelerate launch --multi_gpu
--num_processes N -m modadapt.cli train vit-imagenet ...``, plus ``--cpu`` on CPU; ``batch_size`` is
per process; docs/recipes.md, "Several processes").
Checkpoints hold model, optimizer, scheduler and RNG state; ``resume: true`` continues from the
last one. The run ends with top-1/top-5 on the eval split and ``summary.json`` (accuracy, FLOPs
per image dense vs MoD, kept fraction per layer). Defaults below, then a YAML file, then flags;
the resolved config is saved as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.timm import input_size
from ..errors import ModAdaptError
from ..mod_layer import state_of
from ..output_dir import write_atomic
from .config import RecipeConfig, add_config_arguments, overrides_from
from .training import RunCheckpoint, cpu_field, eval_device, launched_rank, resume_field, train_epochs

NAME = "vit-imagenet"
SPLIT_ALIASES = {"validation": ("validation", "val", "valid"), "train": ("train",), "test": ("test",)}


@dataclass
class ViTRecipeConfig(RecipeConfig):
    """Every field is a YAML key and a ``--flag`` (underscores become dashes)."""

    recipe = "vit-imagenet"
    resumable = RecipeConfig.resumable | {"epochs", "eval_split", "max_eval_samples", "num_workers"}

    data: str = field(default="", metadata={"help": "imagefolder dir, dir of parquet/arrow files, or save_to_disk dir"})
    output: str = field(default="", metadata={"help": "run directory: checkpoints, model, config.yaml, summary.json"})
    model: str = field(default="tiny-vit", metadata={"help": "preset, timm model name, or a modadapt.save directory"})
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "timm.create_model arguments (JSON)"})
    pretrained: bool = field(default=False, metadata={"help": "load timm's pretrained weights (needs network/cache)"})
    train_split: str = field(default="train", metadata={"help": "training split name"})
    eval_split: str = field(default="validation", metadata={"help": "evaluation split name ('' to skip eval)"})
    image_size: int = field(default=0, metadata={"help": "input side in pixels; 0 = the model's own"})
    augment: bool = field(default=True, metadata={"help": "timm training augmentation (else eval transform)"})
    router: str = field(default="attention", metadata={"help": "router name (ignored for a saved MoD model)"})
    capacity: float = field(default=0.5, metadata={"help": "fraction of tokens kept per MoD layer"})
    layers: str = field(default="every-other", metadata={"help": "layers to convert (e.g. every-other, 1,3,5)"})
    router_kwargs: dict = field(default_factory=dict, metadata={"help": "router arguments (JSON)"})
    epochs: int = field(default=1, metadata={"help": "training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=128, metadata={"help": "evaluation batch size per process"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, fp16, bf16"})
    num_workers: int = field(default=0, metadata={"help": "dataloader workers"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training images (0: all)"})
    max_eval_samples: int = field(default=0, metadata={"help": "use only the first N eval images (0: all)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at each epoch end)"})
    resume: bool = resume_field()
    cpu: bool = cpu_field()
    seed: int = field(default=0, metadata={"help": "seed for weights of new models, shuffling and routing"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if not self.data:
            raise ModAdaptError("vit-imagenet: `data` is required (--data PATH).")
        if not self.output:
            raise ModAdaptError("vit-imagenet: `output` is required (-o DIR).")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ModAdaptError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ModAdaptError(f"{name} must be >= 1, got {getattr(self, name)}.")


# --- data -------------------------------------------------------------------------------------------
def load_splits(path: str) -> Any:
    """A `datasets.DatasetDict` from an imagefolder, parquet/arrow files or a save_to_disk dir."""
    import datasets

    from ..local_data import load_local

    root = Path(path)
    if not root.exists():
        raise ModAdaptError(f"data path {path} does not exist.")
    if not root.is_dir():
        raise ModAdaptError(f"data path {path} is not a directory.")
    if (root / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(root))
    for ext, builder in (("parquet", "parquet"), ("arrow", "arrow")):
        files = sorted(root.rglob(f"*.{ext}"))
        if files:
            by_split: dict[str, list[str]] = {}
            for file in files:
                prefix = file.name.split("-")[0].split(".")[0].lower()
                split = next((s for s, names in SPLIT_ALIASES.items() if prefix in names), None)
                if split is None:
                    raise ModAdaptError(
                        f"{file}: cannot tell its split; name files train-*.{ext} / validation-*.{ext} "
                        "as in the Hugging Face ImageNet layout."
                    )
                by_split.setdefault(split, []).append(str(file))
            return load_local(builder, data_files=by_split)
    images = [p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")]
    if not images:
        raise ModAdaptError(
            f"data path {path} holds no images, parquet or arrow files; expected an imagefolder "
            "(train/<class>/*.png), HF ImageNet-layout parquet files, or a save_to_disk directory."
        )
    return load_local("imagefolder", data_dir=str(root))


def pick_split(splits: Any, name: str, path: str) -> Any:
    for alias in SPLIT_ALIASES.get(name, (name,)):
        if alias in splits:
            split = splits[alias]
            break
    else:
        raise ModAdaptError(f"{path} has no {name!r} split; it has {sorted(splits)}. Set train_split/eval_split.")
    missing = [c for c in ("image", "label") if c not in split.column_names]
    if missing:
        raise ModAdaptError(f"{path} split {name!r} lacks column(s) {missing}; columns: {split.column_names}.")
    if len(split) == 0:
        raise ModAdaptError(f"{path} split {name!r} is empty.")
    return split


def make_transforms(model: nn.Module, size: tuple[int, int, int], augment: bool):
    import timm.data

    data_config = timm.data.resolve_data_config({"input_size": size}, model=model)
    data_config["input_size"] = size
    train_tf = timm.data.create_transform(**data_config, is_training=augment)
    eval_tf = timm.data.create_transform(**data_config, is_training=False)
    mode = "RGB" if size[0] == 3 else "L"

    def wrap(tf):
        def apply(batch: dict) -> dict:
            return {
                "pixel_values": [tf(img.convert(mode)) for img in batch["image"]],
                "labels": batch["label"],
            }

        return apply

    return wrap(train_tf), wrap(eval_tf), data_config


def collate(rows: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
    }


# --- model ------------------------------------------------------------------------------------------
def build_model(cfg: ViTRecipeConfig) -> nn.Module:
    """The model to fine-tune, converted (a saved MoD directory keeps its own routing)."""
    import modadapt

    from ..adapters.timm import create_model
    from ..presets import preset_names
    from ..sources import load_model

    if Path(cfg.model).is_dir() or cfg.model in preset_names():
        source = load_model(cfg.model, seed=cfg.seed)
        model = vision_transformer(source.model, cfg.model)
        if source.converted:
            return model
        if cfg.model_kwargs:
            raise ModAdaptError("model_kwargs apply to timm model names, not presets.")
    else:  # a timm model name, which only this recipe takes
        import timm

        if not timm.is_model(cfg.model):
            raise ModAdaptError(f"model {cfg.model!r} is neither a directory, a preset nor a timm model name.")
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, **cfg.model_kwargs)
        if cfg.pretrained:
            pretrained = timm.create_model(cfg.model, pretrained=True, **cfg.model_kwargs)
            model.load_state_dict(pretrained.state_dict())
    modadapt.convert(
        model, router=cfg.router, capacity=cfg.capacity, layers=cfg.layers, router_kwargs=dict(cfg.router_kwargs)
    )
    return model


def vision_transformer(model: nn.Module, name: str) -> nn.Module:
    """`model` if it is a timm ViT (patch embedding + blocks), else a clear error."""
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks")):
        raise ModAdaptError(
            f"vit-imagenet trains timm vision transformers; {name} is a {type(model).__name__} "
            "(lm-adapt trains language models, llava-adapt LLaVA)."
        )
    return model


# --- training ---------------------------------------------------------------------------------------
def evaluate(model, loader, accelerator, progress: bool) -> dict:
    """Top-1 / top-5, loss and kept fraction per layer; `accelerator` None: one process, batches
    moved to the model's device (``modadapt eval``)."""
    from tqdm.auto import tqdm

    import modadapt

    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    kept: dict[int, list[float]] = {}
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    converted = state_of(inner) is not None
    device = next(inner.parameters()).device
    with torch.no_grad():
        for batch in tqdm(
            loader, desc="eval", disable=not (progress and (accelerator is None or accelerator.is_main_process))
        ):
            if accelerator is None:
                batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["pixel_values"]).float()
            labels = batch["labels"]
            if accelerator is not None:
                logits, labels = accelerator.gather_for_metrics((logits, labels))
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(-1).sum())
            total += labels.shape[0]
            for row in modadapt.routing_stats(inner) if converted else ():
                kept.setdefault(row["layer"], []).append(row["kept_fraction"])
    kept_fraction = {str(k): sum(v) / len(v) for k, v in kept.items()}
    if accelerator is not None and accelerator.num_processes > 1 and kept_fraction:
        # each process routed its own share of the images (the same number of batches on each)
        from .training import mean_over_processes

        kept_fraction = dict(zip(kept_fraction, mean_over_processes(accelerator, list(kept_fraction.values()))))
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "images": total,
        "kept_fraction": kept_fraction,
    }


def evaluate_saved(
    directory: str,
    data: str,
    *,
    dense: bool = False,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 of a saved timm ViT (``modadapt eval``) on an image folder (any layout
    `load_splits` reads): its validation split, or its only one, through the model's eval
    transform; with `dense`, of its dense model instead."""
    import modadapt

    if batch_size < 1:
        raise ModAdaptError("batch_size must be >= 1.")
    device = eval_device(device)
    model = vision_transformer(modadapt.load(directory, device=device), directory)
    splits = load_splits(data)
    name = next((a for a in SPLIT_ALIASES["validation"] if a in splits), None)
    if name is None and len(splits) != 1:
        raise ModAdaptError(f"{data} has splits {sorted(splits)} and none is a validation split to evaluate on.")
    name = name or next(iter(splits))
    split = pick_split(splits, name, data)
    if max(split["label"]) >= model.num_classes:
        raise ModAdaptError(
            f"{data} has labels up to {max(split['label'])} but the model's head has "
            f"{model.num_classes} classes; evaluate it on data of the classes it was trained on."
        )
    _, eval_tf, _ = make_transforms(model, input_size(model), augment=False)
    split.set_transform(eval_tf)
    if dense:
        modadapt.unload(model)
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, collate_fn=collate)
    result = evaluate(model, loader, None, progress)
    return {**result, "model": "dense" if dense else "converted", "split": name, "device": str(device)}


def run(cfg: ViTRecipeConfig) -> dict:
    """Train, checkpoint, evaluate and write the run directory; returns the summary."""
    out = Path(cfg.output)
    with RunCheckpoint(cfg) as checkpoint:
        return _run(cfg, out, checkpoint)


def _run(cfg: ViTRecipeConfig, out: Path, checkpoint: RunCheckpoint) -> dict:
    import modadapt

    from ..metrics.measured_flops import measured_flops

    splits = load_splits(cfg.data)
    train_set = pick_split(splits, cfg.train_split, cfg.data)
    eval_set = pick_split(splits, cfg.eval_split, cfg.data) if cfg.eval_split else None
    if cfg.max_train_samples:
        train_set = train_set.select(range(min(cfg.max_train_samples, len(train_set))))
    if eval_set is not None and cfg.max_eval_samples:
        eval_set = eval_set.select(range(min(cfg.max_eval_samples, len(eval_set))))

    model = build_model(cfg)
    size = input_size(model, cfg.image_size)
    classes = train_set.features["label"].num_classes if hasattr(train_set.features["label"], "num_classes") else None
    classes = classes or (max(train_set["label"]) + 1)
    if classes > model.num_classes:
        raise ModAdaptError(
            f"the data has {classes} classes but the model's head has {model.num_classes}; "
            f"set model_kwargs: {{num_classes: {classes}}}."
        )
    train_tf, eval_tf, data_config = make_transforms(model, size, cfg.augment)
    train_set.set_transform(train_tf)
    if eval_set is not None:
        eval_set.set_transform(eval_tf)

    def vit_loss(model, batch, accelerator):
        logits = model(batch["pixel_values"])
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        aux = modadapt.aux_loss(accelerator.unwrap_model(model))
        return loss if aux is None else loss + aux

    accelerator, model, step, loss_history = train_epochs(
        cfg, model, train_set, vit_loss, checkpoint, collate_fn=collate, num_workers=cfg.num_workers
    )

    summary: dict = {"steps": step, "final_train_loss": loss_history[-1] if loss_history else None}
    if eval_set is not None:
        eval_loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                eval_set, batch_size=cfg.eval_batch_size, collate_fn=collate, num_workers=cfg.num_workers
            )
        )
        summary["eval"] = evaluate(model, eval_loader, accelerator, cfg.progress)
    inner = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        example = torch.zeros(1, *size, device=next(inner.parameters()).device)
        inner.eval()
        with modadapt.dense(inner):  # the same weights, routers bypassed: no copy of the model
            dense_flops = measured_flops(inner, example)
        flops = {"mod": measured_flops(inner, example), "dense": dense_flops}
        summary["flops_per_image"] = flops
        summary["flops_ratio"] = flops["mod"]["total"] / flops["dense"]["total"]
        summary["input_size"] = list(size)
        summary["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
        summary["mod_config"] = state_of(inner).config_dict()
        model_dir = out / "model"
        modadapt.save(inner, model_dir, overwrite=True)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    return summary


# --- command line -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ViTRecipeConfig)


def main(args: argparse.Namespace) -> int:
    overrides = overrides_from(args, ViTRecipeConfig)
    cfg = ViTRecipeConfig.resolve(args.config, overrides)
    summary = run(cfg)
    if launched_rank():  # one report for a run of several processes, from the first
        return 0
    ev = summary.get("eval")
    if ev:
        print(f"top-1 {ev['top1']:.4f}  top-5 {ev['top5']:.4f}  ({ev['images']} images)")
    if "flops_ratio" in summary:
        print(f"FLOPs per image: MoD / dense = {summary['flops_ratio']:.3f}")
    print(f"run directory: {cfg.output}", file=sys.stderr)
    return 0
