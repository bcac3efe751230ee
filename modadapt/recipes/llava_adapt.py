"""`llava-adapt`: instruction-tune a Mixture-of-Depths LLaVA model on local LLaVA-format JSON.

The data file is a JSON list of records ``{"image": "digits/7.png", "conversations": [{"from":
"human", "value": "<image>\\nWhat digit is this?"}, {"from": "gpt", "value": "7"}, ...]}``: turns
alternate human / gpt starting with human, the first human turn holds ``<image>`` exactly once,
image paths are relative to the JSON file. A bad record is a clear error naming it. Each record
becomes ``<bos>USER: {human}\\nASSISTANT: {gpt}<eos>...`` with the image's placeholder tokens where
``<image>`` stood; labels are -100 on everything but the answers (the LLaVA adapter's question
role). Text is tokenised as bytes (the presets' tokenizer-free convention), images are resized to
the vision tower's size and scaled to [-1, 1]; models that bring their own processor are refused.

Training uses `accelerate` (mixed precision, DDP on several processes: ``accelerate launch
--multi_gpu --num_processes N -m modadapt.cli train llava-adapt ...``, plus ``--cpu`` on CPU;
``batch_size`` is per process), checkpoints hold model, optimizer,
scheduler and RNG state (``resume: true`` continues), and the run ends with an evaluation on
``eval_data`` (exact-match accuracy of greedy answers, loss) and ``summary.json``: loss, kept
fraction per layer and per token role (image / question / answer), and language-model FLOPs per
sample, dense vs MoD. Defaults below, then a YAML file (``-c``), then flags.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import INFERENCE_ROUTING
from ..errors import ModAdaptError
from ..output_dir import write_atomic
from .config import RecipeConfig, add_config_arguments, overrides_from
from .training import RunCheckpoint, cpu_field, distillation_kl, eval_device, launched_rank, resume_field, train_epochs

NAME = "llava-adapt"
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
BYTE_OFFSET = 4  # ids 0-3: padding, bos, eos, image (the tiny-llava preset's convention)


@dataclass
class LlavaRecipeConfig(RecipeConfig):
    """Every field is a YAML key and a ``--flag`` (underscores become dashes)."""

    recipe = NAME
    resumable = RecipeConfig.resumable | {"epochs", "eval_data", "max_new_tokens"}

    data: str = field(default="", metadata={"help": "LLaVA-format JSON file of training records"})
    eval_data: str = field(default="", metadata={"help": "LLaVA-format JSON file for evaluation ('' to skip)"})
    output: str = field(default="", metadata={"help": "run directory: checkpoints, model, config.yaml, summary.json"})
    model: str = field(default="tiny-llava", metadata={"help": "preset or a modadapt.save / save_pretrained directory"})
    router: str = field(default="shared-vl", metadata={"help": "router name (ignored for a saved MoD model)"})
    capacity: float = field(default=0.5, metadata={"help": "fraction of routed tokens kept per MoD layer"})
    layers: str = field(default="every-other", metadata={"help": "layers to convert (e.g. every-other, 1,3)"})
    router_kwargs: dict = field(default_factory=dict, metadata={"help": "router arguments (JSON)"})
    adapter_kwargs: dict = field(
        default_factory=dict, metadata={"help": "LLaVA adapter options (JSON): protect, route, inference_text"}
    )
    inference_routing: str = field(
        default="causal",
        metadata={
            "help": "eval-mode routing of a new conversion: causal (each token by the causal rule) or topk (a prompt's "
            "image tokens by the training-time top-k: the whole image is in the prompt; decode stays causal)"
        },
    )
    epochs: int = field(default=1, metadata={"help": "training epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    batch_size: int = field(default=16, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=32, metadata={"help": "evaluation batch size per process"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    max_new_tokens: int = field(default=8, metadata={"help": "answer length limit for evaluation"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, fp16, bf16"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at each epoch end)"})
    resume: bool = resume_field()
    cpu: bool = cpu_field()
    seed: int = field(default=0, metadata={"help": "seed for new weights and shuffling"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    distill: float = field(
        default=0.0,
        metadata={
            "help": "weight of KL(model before conversion || model) on the answer tokens' logits (0: off); the "
            "teacher is the dense model the run starts from"
        },
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the distillation KL"})

    def __post_init__(self) -> None:
        if not self.data:
            raise ModAdaptError("llava-adapt: `data` is required (--data FILE.json).")
        if not self.output:
            raise ModAdaptError("llava-adapt: `output` is required (-o DIR).")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ModAdaptError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.inference_routing not in INFERENCE_ROUTING:
            raise ModAdaptError(
                f"inference_routing must be one of {INFERENCE_ROUTING}, got {self.inference_routing!r}."
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ModAdaptError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.distill >= 0 or not self.distill_temperature > 0:
            raise ModAdaptError("distill must be >= 0 and distill_temperature > 0.")


# --- data -------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """Validated records `{"image": Path, "turns": [(human, gpt), ...]}` of a LLaVA-format JSON file."""
    path = Path(path)
    if not path.is_file():
        raise ModAdaptError(f"data file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModAdaptError(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(data, list) or not data:
        raise ModAdaptError(f"{path} must hold a non-empty JSON list of records.")
    return [_record(path, i, raw) for i, raw in enumerate(data)]


def _record(path: Path, index: int, raw: Any) -> dict:
    name = f"{path}: record {index}" + (f" (id {raw['id']!r})" if isinstance(raw, dict) and "id" in raw else "")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("image"), str)
        or not isinstance(raw.get("conversations"), list)
    ):
        raise ModAdaptError(f"{name} needs an 'image' path and a 'conversations' list.")
    image = path.parent / raw["image"]
    if not image.is_file():
        raise ModAdaptError(f"{name}: image file {image} does not exist.")
    turns = raw["conversations"]
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ModAdaptError(f"{name}: turn {t} needs 'from' and a string 'value'.")
        if turn.get("from") not in ROLES:
            raise ModAdaptError(f"{name}: turn {t} has unknown role {turn.get('from')!r}; roles are human and gpt.")
        if turn["from"] != ROLES[t % 2]:
            raise ModAdaptError(
                f"{name}: turn {t} is from {turn['from']!r} but turns must alternate human, gpt, ... starting with human."
            )
    if len(turns) < 2 or len(turns) % 2:
        raise ModAdaptError(f"{name}: conversations must be human/gpt pairs, got {len(turns)} turn(s).")
    if turns[0]["value"].count(IMAGE_PLACEHOLDER) != 1:
        raise ModAdaptError(f"{name}: the first human turn must contain {IMAGE_PLACEHOLDER} exactly once.")
    if any(IMAGE_PLACEHOLDER in turn["value"] for turn in turns[1:]):
        raise ModAdaptError(f"{name}: {IMAGE_PLACEHOLDER} may only appear in the first human turn.")
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
    return {"image": image, "turns": pairs}


class ByteCodec:
    """Text <-> ids as UTF-8 bytes shifted past the special ids (padding, bos, eos, image)."""

    def __init__(self, config: Any):
        text = config.get_text_config(decoder=True)
        self.vocab = text.vocab_size
        if self.vocab < BYTE_OFFSET + 256:
            # bytes above 127 would wrap; prompts are expected to be ASCII then
            self.vocab = max(self.vocab, BYTE_OFFSET + 128)
        self.bos, self.eos = text.bos_token_id, text.eos_token_id
        self.pad = text.pad_token_id if text.pad_token_id is not None else 0
        from ..adapters.hf.llava import image_token_id

        self.image = image_token_id(config)
        self.image_tokens = int(config.image_seq_length)

    def encode(self, text: str) -> list[int]:
        out = []
        for part_index, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if part_index:
                out += [self.image] * self.image_tokens
            out += [BYTE_OFFSET + b % (self.vocab - BYTE_OFFSET) for b in part.encode()]
        return out

    def decode(self, ids: list[int]) -> str:
        chars = []
        for i in ids:
            if i == self.eos:
                break
            if i >= BYTE_OFFSET:
                chars.append(i - BYTE_OFFSET)
        return bytes(c for c in chars if c < 256).decode(errors="replace")

    def sample(self, record: dict, with_answer: bool = True) -> tuple[list[int], list[int], str]:
        """`(ids, labels, last answer)`; without the answer, the prompt for generating it."""
        ids, labels = [self.bos], [-100]
        for t, (human, gpt) in enumerate(record["turns"]):
            question = self.encode(f"USER: {human}\nASSISTANT: ")
            ids += question
            labels += [-100] * len(question)
            last = t == len(record["turns"]) - 1
            if last and not with_answer:
                break
            answer = self.encode(gpt) + [self.eos]
            ids += answer
            labels += answer
        return ids, labels, record["turns"][-1][1]


def load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        data = torch.tensor(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def collate(rows: list[tuple[list[int], list[int], torch.Tensor]], pad: int) -> dict:
    """Left-padded batch (the adapter takes padding from the attention mask)."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (i, lab, _) in enumerate(rows):
        ids[r, width - len(i) :] = torch.tensor(i)
        labels[r, width - len(i) :] = torch.tensor(lab)
        mask[r, width - len(i) :] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.stack([img for _, _, img in rows]),
    }


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict], codec: ByteCodec, size: int, with_answer: bool = True):
        self.records, self.codec, self.size, self.with_answer = records, codec, size, with_answer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        ids, labels, _ = self.codec.sample(self.records[index], self.with_answer)
        return ids, labels, load_image(self.records[index]["image"], self.size)


def calibration_batches(
    data: str | None, model: nn.Module, *, samples: int, batch_size: int, seed: int
) -> tuple[list[dict], str, str]:
    """`(batches, path as recorded, sha256)` of image + prompt inputs for layer analysis.

    `data` is a LLaVA-format JSON file (its first `samples` records, answers included); None gives
    seeded noise images with a fixed question, only meaningful for the randomly initialised presets.
    """
    import hashlib
    import random

    codec = ByteCodec(model.config)
    size = int(model.config.vision_config.image_size)
    if data is None:
        generator = torch.Generator().manual_seed(seed)
        ids = codec.sample({"turns": [(f"{IMAGE_PLACEHOLDER}\nWhat is in this picture?", "")]}, False)[0]
        rows = [(ids, ids, torch.rand(3, size, size, generator=generator) * 2 - 1) for _ in range(samples)]
        source, digest = "builtin:noise", hashlib.sha256(f"llava-noise:{seed}".encode()).hexdigest()
    else:
        records = read_records(data)
        if len(records) > samples:
            records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), samples))]
        rows = list(LlavaDataset(records, codec, size))
        source, digest = str(data), hashlib.sha256(Path(data).read_bytes()).hexdigest()
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], codec.pad)
        batch.pop("labels")
        batches.append(batch)
    return batches, source, digest


# --- model ------------------------------------------------------------------------------------------
def build_model(cfg: LlavaRecipeConfig) -> nn.Module:
    """The model to fine-tune, converted (a saved MoD directory keeps its own routing)."""
    import modadapt

    from ..sources import load_model

    path = Path(cfg.model)
    if path.is_dir() and any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
    ):
        raise ModAdaptError(
            f"{path} brings its own tokenizer/processor; llava-adapt tokenises as bytes (tiny models) and "
            "does not use model processors yet."
        )
    source = load_model(cfg.model, seed=cfg.seed)
    model = llava_model(source.model, cfg.model)
    if source.converted:
        return model
    modadapt.convert(
        model,
        router=cfg.router,
        capacity=cfg.capacity,
        layers=cfg.layers,
        router_kwargs=dict(cfg.router_kwargs),
        adapter_kwargs=dict(cfg.adapter_kwargs),
        inference_routing=cfg.inference_routing,
    )
    return model


def llava_model(model: nn.Module, name: str) -> nn.Module:
    """`model` if it is a LLaVA model, else a clear error (not a complaint about its config)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "llava":
        raise ModAdaptError(
            f"llava-adapt trains LLaVA models (LlavaForConditionalGeneration); {name} is a "
            f"{type(model).__name__} (lm-adapt trains language models, vit-imagenet timm ViTs)."
        )
    return model


def lm_flops(model: nn.Module, tokens: int, kept: dict[str, float]) -> dict:
    """Language-model layer FLOPs per sample of `tokens` tokens (the head left out): dense, and MoD
    at the measured kept fraction of each converted layer (`modadapt.metrics.flops`)."""
    from ..metrics.flops import flops_table, sequence_flops
    from ..routers.base import kept_count

    table = {**flops_table(model), "head": 0}
    dense = sequence_flops(table, tokens)
    mod = sequence_flops(table, tokens, {int(i): kept_count(max(f, 1e-9), tokens) for i, f in kept.items()})
    return {"dense": dense, "mod": mod, "ratio": mod / dense, "tokens": tokens}


def evaluate(
    inner: nn.Module,
    records: list[dict],
    codec: ByteCodec,
    size: int,
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = False,
) -> dict:
    """Exact-match accuracy of greedy answers, loss, kept fractions per layer and token role (one
    process, on the model's device)."""
    from tqdm.auto import tqdm

    from ..adapters.hf.llava import role_stats
    from ..mod_layer import state_of

    device = next(inner.parameters()).device
    converted = state_of(inner) is not None
    inner.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    role_sums: dict[str, dict[str, list[int]]] = {}
    lengths = 0
    with torch.no_grad():
        for start in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress):
            chunk = records[start : start + batch_size]
            full = collate([(*codec.sample(r)[:2], load_image(r["image"], size)) for r in chunk], codec.pad)
            full = {k: v.to(device) for k, v in full.items()}
            out = inner(**full)
            n = int((full["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * n
            tokens += n
            lengths += int(full["attention_mask"].sum())
            for row in role_stats(inner) if converted else ():
                acc = role_sums.setdefault(str(row["layer"]), {})
                for role in ("image", "question", "answer"):
                    kept, seen = acc.setdefault(role, [0, 0])
                    acc[role] = [kept + row[f"{role}_kept"], seen + row[f"{role}_tokens"]]
            prompts = collate(
                [(*codec.sample(r, with_answer=False)[:2], load_image(r["image"], size)) for r in chunk], codec.pad
            )
            generated = inner.generate(
                input_ids=prompts["input_ids"].to(device),
                attention_mask=prompts["attention_mask"].to(device),
                pixel_values=prompts["pixel_values"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=codec.pad,
                eos_token_id=codec.eos,
            )
            width = prompts["input_ids"].shape[1]
            for r, record in enumerate(chunk):
                answer = codec.decode(generated[r, width:].tolist()).strip()
                correct += int(answer == record["turns"][-1][1].strip())
                total += 1
    per_role = {
        layer: {role: (k / s if s else None) for role, (k, s) in roles.items()} for layer, roles in role_sums.items()
    }
    kept_all = {
        layer: sum(k for k, _ in roles.values()) / max(1, sum(s for _, s in roles.values()))
        for layer, roles in role_sums.items()
    }
    return {
        "accuracy": correct / max(total, 1),
        "loss": loss_sum / max(tokens, 1),
        "samples": total,
        "kept_fraction": kept_all,
        "kept_fraction_by_role": per_role,
        "mean_tokens": lengths / max(total, 1),
    }


def evaluate_saved(
    directory: str,
    data: str,
    *,
    dense: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Exact-match answer accuracy and loss of a saved LLaVA model (``modadapt eval``) on
    LLaVA-format JSON, as llava-adapt evaluates; with `dense`, of its dense model instead."""
    import modadapt

    if batch_size < 1 or max_new_tokens < 1:
        raise ModAdaptError("batch_size and max_new_tokens must be >= 1.")
    device = eval_device(device)
    model = llava_model(modadapt.load(directory, device=device), directory)
    records = read_records(data)
    codec = ByteCodec(model.config)
    if dense:
        modadapt.unload(model)
    result = evaluate(
        model,
        records,
        codec,
        int(model.config.vision_config.image_size),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return {**result, "model": "dense" if dense else "converted", "device": str(device)}


def run(cfg: LlavaRecipeConfig) -> dict:
    """Train, checkpoint, evaluate and write the run directory; returns the summary."""
    out = Path(cfg.output)
    with RunCheckpoint(cfg) as checkpoint:
        return _run(cfg, out, checkpoint)


def _run(cfg: LlavaRecipeConfig, out: Path, checkpoint: RunCheckpoint) -> dict:
    import modadapt

    train_records = read_records(cfg.data)
    eval_records = read_records(cfg.eval_data) if cfg.eval_data else None

    model = build_model(cfg)
    codec = ByteCodec(model.config)
    size = int(model.config.vision_config.image_size)

    train_set = LlavaDataset(train_records, codec, size)
    # Every weight trains here, so the teacher (the model before conversion) is a frozen copy, the only one.
    teacher = modadapt.unload(copy.deepcopy(model)).eval().requires_grad_(False) if cfg.distill else None

    def loss_fn(model, batch, _):
        out = model(**batch)  # the loss includes the routers' aux losses
        if teacher is None:
            return out.loss
        with torch.no_grad():
            target = teacher.to(out.logits.device)(**{k: v for k, v in batch.items() if k != "labels"}).logits
        answer = torch.zeros_like(batch["labels"], dtype=torch.bool)  # logits at t predict the label at t + 1
        answer[:, :-1] = batch["labels"][:, 1:] != -100
        return out.loss + cfg.distill * distillation_kl(out.logits, target, cfg.distill_temperature, answer)

    accelerator, model, step, losses = train_epochs(
        cfg,
        model,
        train_set,
        loss_fn,
        checkpoint,
        collate_fn=lambda rows: collate(rows, codec.pad),
    )
    teacher = None  # frees the copy before evaluation (loss_fn is done with it)

    summary: dict = {"steps": step, "final_train_loss": losses[-1] if losses else None}
    inner = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if eval_records is not None:
            ev = evaluate(
                inner,
                eval_records,
                codec,
                size,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
                progress=cfg.progress,
            )
            summary["eval"] = ev
            summary["flops_per_sample"] = lm_flops(inner, round(ev["mean_tokens"]), ev["kept_fraction"])
        from ..mod_layer import state_of

        summary["mod_config"] = state_of(inner).config_dict()
        modadapt.save(inner, out / "model", overwrite=True)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    return summary


# --- command line -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, LlavaRecipeConfig)


def main(args: argparse.Namespace) -> int:
    cfg = LlavaRecipeConfig.resolve(args.config, overrides_from(args, LlavaRecipeConfig))
    summary = run(cfg)
    if launched_rank():  # one report for a run of several processes, from the first
        return 0
    ev = summary.get("eval")
    if ev:
        print(f"accuracy {ev['accuracy']:.4f}  loss {ev['loss']:.4f}  ({ev['samples']} samples)")
        print(f"LM FLOPs per sample: MoD / dense = {summary['flops_per_sample']['ratio']:.3f}")
    print(f"run directory: {cfg.output}", file=sys.stderr)
    return 0
