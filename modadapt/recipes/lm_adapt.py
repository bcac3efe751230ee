"""`lm-adapt`: adapt a Mixture-of-Depths causal LM on local text so that it recovers its quality.

The model is a directory written by ``modadapt convert`` / `modadapt.save` (trained as it is), or a
dense model (a preset or a local transformers directory) converted on the fly with ``router``,
``capacity``, ``layers`` and ``router_kwargs``; ``router: none`` trains a dense model as it is
(healing one that `modadapt prune` deleted layers of: then distill from the original with
``teacher``), and saves it as a plain transformers model. Text is local: ``.txt`` / ``.jsonl`` (a ``text``
field) files, optionally gzipped, or a directory of them, or `datasets` files (``.parquet``,
``.arrow``, a ``save_to_disk`` directory) with a ``text`` column. It is tokenised with the model
directory's tokenizer when there is one, else as UTF-8 bytes modulo the vocabulary, and packed
into blocks of ``seq_len`` tokens.

What trains: ``routers`` (router parameters only), ``lora`` (routers + LoRA adapters on the layers'
attention and MLP projections, via `peft`; merged into the weights at the end) or ``all``. The loss
is the model's ``outputs.loss``, which already includes the routers' auxiliary losses and, in a
mixture-of-experts model, the experts' load-balancing loss over the kept tokens (both logged
separately), plus ``distill`` × KL(dense teacher ‖ model) on the logits when ``distill > 0``.
`accelerate` gives mixed precision, gradient accumulation and several processes, on GPUs or CPU:
DDP (``accelerate launch --multi_gpu --num_processes N -m modadapt.cli train lm-adapt ...``, plus
``--cpu`` on CPU, or ``torchrun --nproc_per_node N -m modadapt.cli ...``) and FSDP2 for models that
do not fit one GPU (``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m
modadapt.cli train lm-adapt ...``); ``batch_size`` is per process (docs/recipes.md, "Several
processes"). A step whose loss (or, outside fp16,
gradient norm) is not finite is skipped; more than ``max_bad_steps`` of them abort the run.
Checkpoints hold model, optimizer, scheduler, step and RNG state; ``resume: true`` continues
with the run's saved configuration (flags may change only steps, checkpointing, evaluation
batches and progress); SIGINT / SIGTERM stop at a step boundary with a checkpoint.
The run ends with ``summary.json``: validation perplexity of the dense model and of the converted
one before and after training, kept fraction per layer, FLOPs per token relative to dense; the
adapted model is saved with `modadapt.save` in ``model/``. Defaults below, then a YAML file, then
flags; the resolved config is saved as ``config.yaml``. The defaults' router (``topk``) and
distillation (``distill: 1.0``) are the best setting the quality benchmark found
(`benchmarks/results/lm_quality_scale.md`); so is placing the routers with ``layers: evenly:N``, N
one more than the layers deletion would remove at the same FLOPs (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SCOPES, parse_router_args
from ..errors import ModAdaptError
from ..lora import projection_names
from ..metrics.flops import flops_table, sequence_flops
from ..mod_layer import state_of
from ..output_dir import write_atomic
from ..persistence import save_unconverted
from ..prune import describe, read_record
from ..routers.base import Router
from ..sources import is_causal_lm, load_model
from .config import RecipeConfig, add_config_arguments, overrides_from, run_setting
from .schedule import AdaptationSchedule
from .training import (
    RunCheckpoint,
    cpu_field,
    distillation_kl,
    eval_device,
    finish_fsdp_wrap,
    fsdp_units,
    is_fsdp,
    launched_rank,
    load_full_state,
    lr_schedule,
    make_accelerator,
    meta_copy,
    resume_field,
    set_fsdp_wrap,
    train_loop,
)

NAME = "lm-adapt"
#: `router` for training a dense model unconverted (a pruned model's healing).
NO_ROUTER = "none"
TRAIN_MODES = ("routers", "lora", "all")
ROUTER_INITS = ("zero", "update-size")
DATASET_SUFFIXES = (".parquet", ".arrow")


@dataclass
class LMAdaptConfig(RecipeConfig):
    """Every field is a YAML key and a ``--flag`` (underscores become dashes)."""

    recipe = "lm-adapt"
    resumable = RecipeConfig.resumable | {"max_eval_blocks", "max_bad_steps"}

    data: str = field(
        default="", metadata={"help": "training text: .txt/.jsonl(.gz) file or dir, .parquet/.arrow, save_to_disk dir"}
    )
    output: str = field(default="", metadata={"help": "run directory: checkpoints, model/, config.yaml, summary.json"})
    valid_data: str = field(
        default="", metadata={"help": "validation text (same formats); '' = hold out valid_fraction of data"}
    )
    valid_fraction: float = field(
        default=0.05, metadata={"help": "share of the training blocks held out when valid_data is ''"}
    )
    model: str = field(default="tiny-llama", metadata={"help": "modadapt.save dir, dense transformers dir, or preset"})
    router: str = field(
        default="topk",
        metadata={
            "help": "router for a dense model (ignored for a saved MoD model); none: train it unconverted "
            "(a pruned model's healing, with train: all and teacher: ORIGINAL)"
        },
    )
    capacity: float = field(default=0.125, metadata={"help": "fraction of tokens a capacity router keeps"})
    layers: str = field(
        default="every-other",
        metadata={"help": "layers to convert (every-other, all-but-first, evenly:N, 1,3,5, from:REPORT_DIR)"},
    )
    router_kwargs: dict = field(
        default_factory=dict, metadata={"help": "router arguments (JSON; CLI also --router-arg K=V)"}
    )
    scope: str = field(
        default="block", metadata={"help": "what a MoD layer routes for a dense model: block, attention or mlp"}
    )
    train: str = field(
        default="routers", metadata={"help": "what trains: routers, lora (routers + LoRA via peft), all"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (train: lora)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (train: lora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (train: lora)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed block"})
    batch_size: int = field(default=8, metadata={"help": "blocks per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps (epochs repeat over the blocks)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    capacity_warmup: int = field(
        default=0,
        metadata={
            "help": "steps over which every router goes from keeping all "
            "tokens to its capacity (threshold-p: its target); 0: off"
        },
    )
    router_steps: int = field(
        default=0,
        metadata={"help": "first steps that train the routers only (the model frozen), within max_steps; 0: off"},
    )
    distill: float = field(default=1.0, metadata={"help": "weight of KL(dense teacher || model) on logits (0: off)"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the distillation KL"})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "model directory or preset to distill from (its dense computation) instead of the "
            "starting weights: for a model trained or pruned before this run (default: the starting weights)"
        },
    )
    router_init: str = field(
        default="zero",
        metadata={
            "help": "zero: routers as converted; update-size: fit each "
            "linear router score to how much its layer moves each token "
            "(dense forwards over router_init_blocks training blocks)"
        },
    )
    router_init_blocks: int = field(
        default=32, metadata={"help": "training blocks the update-size fit runs on (evenly spaced over the split)"}
    )
    router_lr_scale: float = field(default=1.0, metadata={"help": "router learning rate as a multiple of lr"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no, fp16, bf16"})
    max_bad_steps: int = field(default=10, metadata={"help": "abort after this many skipped non-finite steps"})
    eval_batch_size: int = field(default=8, metadata={"help": "blocks per evaluation forward"})
    max_eval_blocks: int = field(
        default=0, metadata={"help": "evaluate on at most N validation blocks, evenly spaced over the split (0: all)"}
    )
    calibrate_blocks: int = field(
        default=32,
        metadata={
            "help": "after training, set each calibrated causal cut-off on N training blocks (evenly spaced), every "
            "layer routing as inference does, so that the model keeps its capacity there "
            "(modadapt.calibrate_cutoffs; 0: keep training's running average)"
        },
    )
    max_train_blocks: int = field(default=0, metadata={"help": "train on at most the first N blocks (0: all)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    resume: bool = resume_field()
    cpu: bool = cpu_field()
    seed: int = field(default=0, metadata={"help": "seed for preset weights, data order and the held-out split"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if not self.data:
            raise ModAdaptError("lm-adapt: `data` is required (--data PATH).")
        if not self.output:
            raise ModAdaptError("lm-adapt: `output` is required (-o DIR).")
        if self.train not in TRAIN_MODES:
            raise ModAdaptError(f"train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}.")
        if self.scope not in SCOPES:
            raise ModAdaptError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ModAdaptError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        for name, low in (
            ("seq_len", 2),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("max_steps", 1),
            ("eval_batch_size", 1),
            ("lora_rank", 1),
            ("max_bad_steps", 0),
            ("calibrate_blocks", 0),
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ModAdaptError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}.")
        for name in ("capacity_warmup", "router_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.max_steps:
                raise ModAdaptError(
                    f"{name} must be an integer from 0 to max_steps - 1 ({self.max_steps - 1}), got {value!r}."
                )
        if self.router_steps and self.train == "routers":
            raise ModAdaptError(
                "router_steps trains the routers first and then the model: use it with train: all or "
                "train: lora (train: routers trains only the routers throughout)."
            )
        if self.router_init not in ROUTER_INITS:
            raise ModAdaptError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}.")
        if not isinstance(self.router_init_blocks, int) or self.router_init_blocks < 1:
            raise ModAdaptError(f"router_init_blocks must be an integer >= 1, got {self.router_init_blocks!r}.")
        if not self.router_lr_scale > 0:
            raise ModAdaptError(f"router_lr_scale must be > 0, got {self.router_lr_scale!r}.")
        if not self.distill >= 0 or not self.distill_temperature > 0:
            raise ModAdaptError("distill must be >= 0 and distill_temperature > 0.")
        if self.teacher is not None and not self.distill > 0:
            raise ModAdaptError("a teacher is given but distill is 0: set distill > 0 to distill from it.")
        if self.router == NO_ROUTER:
            if self.train == "routers":
                raise ModAdaptError(
                    "router: none trains the model unconverted, so there are no routers to train; "
                    "use train: all (or lora)."
                )
            defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(self)}
            unrouted = (
                "capacity",
                "layers",
                "router_kwargs",
                "scope",
                "capacity_warmup",
                "router_steps",
                "router_init",
            )
            for name in unrouted:
                default = defaults[name]
                if getattr(self, name) != default:
                    raise ModAdaptError(
                        f"router: none trains the model unconverted, so {name} has no router to act on; "
                        f"leave it at {default!r} (to delete layers, `modadapt prune` the model first)."
                    )
        if not 0.0 < self.valid_fraction < 1.0:
            raise ModAdaptError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}.")
        if not self.lr > 0:
            raise ModAdaptError(f"lr must be > 0, got {self.lr}.")


# --- data -------------------------------------------------------------------------------------------
def read_corpus(path: str) -> str:
    """All text under `path`: text files via `metrics.calibration.read_text`, `datasets` files by
    their ``text`` column."""
    from ..metrics.calibration import read_text

    root = Path(path)
    if not root.exists():
        raise ModAdaptError(f"data path {path} does not exist; give a local text file, directory or datasets file.")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in DATASET_SUFFIXES)
    is_saved = root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file())
    if is_saved or (files and all(f.suffix in DATASET_SUFFIXES for f in files)):
        import datasets

        from ..local_data import load_local

        try:
            if is_saved:
                loaded = datasets.load_from_disk(str(root))
            else:
                builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
                loaded = load_local(builder, data_files=[str(f) for f in files], split="train")
        except Exception as exc:
            raise ModAdaptError(f"could not read datasets files at {path}: {exc}") from None
        parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        texts = []
        for part in parts:
            if "text" not in part.column_names:
                raise ModAdaptError(f"{path} has no 'text' column; columns: {part.column_names}.")
            texts.extend(t for t in part["text"] if isinstance(t, str))
        text = "\n\n".join(texts)
        if not text.strip():
            raise ModAdaptError(f"data path {path} holds no text.")
        return text
    return read_text(path)[0]


def tokenize(text: str, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of `text`: the model's tokenizer, else UTF-8 bytes modulo the vocabulary.

    A fast tokenizer encodes long text in parallel chunks (`encode_in_chunks`), which gives the
    same ids as one call: a 100M-character corpus takes seconds instead of minutes.
    """
    if tokenizer is None:
        return [b % vocab_size for b in text.encode("utf-8")]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if len(text) > CHUNK_CHARS and byte_level_without_prefix(backend):
        return encode_in_chunks(backend, text)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


CHUNK_CHARS = 1 << 20


def byte_level_without_prefix(backend: Any) -> bool:
    """Whether `backend` (a `tokenizers.Tokenizer`) splits text GPT-2 style and nothing else
    depends on where the text starts: a ByteLevel pre-tokenizer without a prefix space and no
    normalizer (SentencePiece-style tokenizers mark the start of every text, so chunks differ)."""
    pre = getattr(backend, "pre_tokenizer", None)
    return (
        type(pre).__name__ == "ByteLevel"
        and not getattr(pre, "add_prefix_space", True)
        and getattr(backend, "normalizer", None) is None
    )


def chunk_boundaries(text: str, size: int | None = None) -> list[int]:
    """Cut points about `size` characters apart, each just before the last newline of a blank
    line (`"\n|\n"` followed by a non-space character).

    GPT-2-style pre-tokenizers split a whitespace run that precedes a word into the run less its
    last character and that character, so a cut there (never inside a word or a space run) gives
    exactly the pre-tokens of the whole text. Text without such places is one chunk.
    """
    size = size or CHUNK_CHARS
    cuts, start = [0], 0
    while start + size < len(text):
        at = text.find("\n\n", start + size)
        while at != -1 and (at + 2 >= len(text) or text[at + 2].isspace()):
            at = text.find("\n\n", at + 1)
        if at == -1:
            break
        cuts.append(at + 1)
        start = at + 1
    return cuts + [len(text)]


def encode_in_chunks(backend: Any, text: str) -> list[int]:
    """`backend.encode_batch` over `chunk_boundaries(text)` (parallel in the Rust library),
    concatenated, without special tokens."""
    cuts = chunk_boundaries(text)
    chunks = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    ids: list[int] = []
    for encoding in backend.encode_batch(chunks, add_special_tokens=False):
        ids.extend(encoding.ids)
    return ids


def pack(ids: list[int], seq_len: int, source: str) -> torch.Tensor:
    """`[N, seq_len]` consecutive blocks of `ids` (the remainder is dropped)."""
    count = len(ids) // seq_len
    if count == 0:
        raise ModAdaptError(
            f"{source} has {len(ids)} tokens, fewer than one block of seq_len {seq_len}; "
            "give more text or a shorter seq_len."
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def load_blocks(cfg: LMAdaptConfig, tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation blocks (validation held out from training when no valid_data)."""
    train = pack(tokenize(read_corpus(cfg.data), tokenizer, vocab_size), cfg.seq_len, cfg.data)
    if cfg.valid_data:
        valid = pack(tokenize(read_corpus(cfg.valid_data), tokenizer, vocab_size), cfg.seq_len, cfg.valid_data)
    else:
        if len(train) < 2:
            raise ModAdaptError(f"{cfg.data} makes only {len(train)} block; give valid_data or more text.")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        held = max(1, round(cfg.valid_fraction * len(train)))
        valid, train = train[order[:held].sort().values], train[order[held:].sort().values]
    if cfg.max_train_blocks:
        train = train[: cfg.max_train_blocks]
    if cfg.max_eval_blocks:
        valid = spread_blocks(valid, cfg.max_eval_blocks)
    return train, valid


def spread_blocks(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of `blocks` evenly spaced over them (all of them when there are no more). A corpus
    is read document after document, often sorted by source, so its first blocks can all come from
    one source: a sample of them would fit cut-offs or routers to that source alone."""
    if len(blocks) <= count:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, count, dtype=torch.float64).round().long()]


# --- model ------------------------------------------------------------------------------------------
def build_model(
    cfg: LMAdaptConfig, model: nn.Module | None = None, teacher: nn.Module | None = None
) -> tuple[nn.Module, nn.Module | None, Any, list[str]]:
    """`(converted model, frozen teacher or None, tokenizer or None, tokenizer files)`.

    `model` (Python API) is used as it is when converted, else converted with `cfg`'s routing.
    The dense baseline, and the teacher while the base weights are frozen, is the model itself
    under `original`; distillation with ``train: all`` copies it (before conversion, or
    `modadapt.unload` of a copy), unless `teacher` (Python API) names the model to distill from.
    """
    import modadapt

    tokenizer, extras = None, []
    if model is None:
        source = load_model(cfg.model, seed=cfg.seed)
        model, tokenizer, extras = source.model, source.tokenizer, source.files
        check_teacher_seed(cfg)
    if not is_causal_lm(model):
        raise ModAdaptError(f"lm-adapt trains causal language models; {type(model).__name__} is not one.")
    if cfg.router == NO_ROUTER and state_of(model) is not None:
        raise ModAdaptError(
            "router: none trains a dense model, and this one is converted; train it with its routers "
            "(leave router out) or give its dense original."
        )
    teacher = frozen_teacher(cfg, model, teacher)
    if state_of(model) is None and cfg.router != NO_ROUTER:
        modadapt.convert(
            model,
            router=cfg.router,
            capacity=cfg.capacity,
            layers=cfg.layers,
            router_kwargs=dict(cfg.router_kwargs),
            scope=cfg.scope,
        )
    return model, teacher, tokenizer, extras


def check_teacher_seed(cfg: LMAdaptConfig) -> None:
    """A pruned preset's teacher must be the preset it was pruned from: built with the seed
    `modadapt prune` recorded, which a preset teacher (built with `cfg.seed`) has only if they agree."""
    record = read_record(cfg.model) if Path(cfg.model).is_dir() else None
    if record and cfg.teacher == record.get("original", record["source"]) and "seed" in record:
        if record["seed"] != cfg.seed:
            raise ModAdaptError(
                f"the teacher {cfg.teacher} is a preset built with --seed {cfg.seed}, but {cfg.model} was pruned "
                f"from the one built with seed {record['seed']}; pass --seed {record['seed']}, or save the "
                "original to a directory and name that."
            )


def frozen_teacher(cfg: LMAdaptConfig, model: nn.Module, given: nn.Module | None) -> nn.Module | None:
    """The model to distill from, frozen, with a converted one's dense computation: `given`, else
    `cfg.teacher` loaded, else (distillation with ``train: all``) a copy of the starting weights,
    which training moves; None where the teacher is `model` itself under `original`."""
    import modadapt

    teacher, owned = given, False
    if cfg.teacher is not None:
        try:
            teacher, owned = load_model(cfg.teacher, seed=cfg.seed).model, True
        except ModAdaptError as error:
            raise ModAdaptError(f"teacher: {error}") from None
    elif teacher is None:
        if not (cfg.distill > 0 and cfg.train == "all"):
            return None
        teacher, owned = copy.deepcopy(model), True
    if state_of(teacher) is not None:
        teacher = modadapt.unload(teacher if owned else copy.deepcopy(teacher))
    if not is_causal_lm(teacher):
        raise ModAdaptError(f"the teacher must be a causal language model; {type(teacher).__name__} is not one.")
    vocab, own_vocab = teacher.config.get_text_config().vocab_size, model.config.get_text_config().vocab_size
    if vocab != own_vocab:
        raise ModAdaptError(
            f"the teacher's vocabulary ({vocab}) is not the model's ({own_vocab}): distillation compares "
            "their logits token by token."
        )
    return teacher.eval().requires_grad_(False)


@contextlib.contextmanager
def original(inner: nn.Module, trained: nn.Module):
    """Within: `inner` is the dense model it was converted from, in eval mode, on the same weights
    (`modadapt.dense`, and peft's adapters off when `trained` is its LoRA wrapper). Exactly the
    model the run started from while the base weights stay frozen (train: routers or lora)."""
    import modadapt

    was_training = inner.training
    with contextlib.ExitStack() as stack:
        if state_of(inner) is not None:  # an unconverted model (router: none) is its own original
            stack.enter_context(modadapt.dense(inner))
        if trained is not inner:
            stack.enter_context(trained.disable_adapter())
        inner.eval()
        try:
            yield inner
        finally:
            inner.train(was_training)


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Refuse blocks longer than the model's positions (they would train and score on garbage)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ModAdaptError(
            f"seq_len {seq_len} is longer than the model's max_position_embeddings {limit}; "
            f"use --seq-len {limit} or less."
        )


def router_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if ".router." in f".{name}"]


def fit_routers(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """`router_init: update-size` (see `modadapt.recipes.router_init`): dense forwards on `device`
    in the model's dtype, the fit in float64."""
    from .router_init import fit_router_scores

    model.to(device)
    was_training = model.training
    model.eval()
    fitted = fit_router_scores(
        model, [{"input_ids": b.to(device), "use_cache": False} for b in blocks.split(batch_size)]
    )
    model.train(was_training)
    if launched_rank() == 0:  # every process fits the same routers on the same blocks; one says so
        print(
            "router_init update-size: score/target correlation per layer "
            + ", ".join(f"{i}: {r:.2f}" for i, r in fitted.items()),
            flush=True,
        )


def param_groups(trained: nn.Module, params: list, cfg: LMAdaptConfig) -> list:
    """One optimizer group, or two when the routers' learning rate is scaled (`router_lr_scale`)."""
    if cfg.router_lr_scale == 1.0:
        return params
    routers = {id(p) for m in trained.modules() if isinstance(m, Router) for p in m.parameters()}
    return [
        {"params": [p for p in params if id(p) not in routers]},
        {"params": [p for p in params if id(p) in routers], "lr": cfg.lr * cfg.router_lr_scale},
    ]


def select_trainable(model: nn.Module, cfg: LMAdaptConfig) -> nn.Module:
    """Freeze what does not train; for `lora`, wrap the model with peft (returns the wrapper)."""
    routers = set(router_parameter_names(model))
    if cfg.train == "all":
        model.requires_grad_(True)
        return model
    if not routers and cfg.train == "routers":
        raise ModAdaptError(
            f"router {model_router_name(model)!r} has no parameters, so train: routers has nothing to train; "
            "use train: lora or train: all."
        )
    if cfg.train == "routers":
        for name, param in model.named_parameters():
            param.requires_grad_(name in routers)
        return model
    try:
        import peft
    except ImportError:
        raise ModAdaptError("train: lora needs peft; `pip install peft` (or modadapt[lora]).") from None
    from ..plugins import find_adapter

    transposed = find_adapter(model).transposed_linear_weights(model)
    lora = peft.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=projection_names(model),
        fan_in_fan_out=transposed,
    )
    wrapped = peft.get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if name in routers:
            param.requires_grad_(True)
    return wrapped


def model_router_name(model: nn.Module) -> str:
    return state_of(model).config.router


# --- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    accelerator=None,
    progress: bool = False,
    desc: str = "eval",
    table: dict | None = None,
    runner: nn.Module | None = None,
) -> dict:
    """Perplexity of `model` on `blocks` (eval mode, default routing), per-layer kept fractions and
    FLOPs per token (the converted model's per-row kept counts in the formula of `sequence_flops`;
    `table`: its `flops_table`). A model inside `modadapt.dense` counts as the dense one.

    Under `accelerate` each process takes every n-th block and the sums are reduced. `runner`
    (FSDP: the sharded model that holds `model`) is what is called; every process then runs the
    same number of forwards (FSDP gathers each layer from all of them), the extra ones uncounted.
    """
    from tqdm.auto import tqdm

    from ..convert import mod_layers

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    state = state_of(model)
    converted = state is not None and not state.dense
    table = flops_table(model) if table is None else table
    layers = mod_layers(model) if converted else []
    indices = [layer.mod_state.index for layer in layers]
    was_training = model.training
    model.eval()
    mine = blocks[rank::world]
    # loss sum, predicted tokens, input tokens, mod FLOPs, dense FLOPs, then kept and all tokens per MoD layer
    sums = torch.zeros(5 + 2 * len(layers), dtype=torch.float64)
    batches = mine.split(batch_size)
    call = model if runner is None else runner
    if runner is not None:
        runner.eval()
        for _ in range(math.ceil(len(blocks[0::world]) / batch_size) - len(batches)):  # in step with the others
            with accelerator.autocast():
                call(input_ids=blocks[:1].to(device), use_cache=False)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        if accelerator is not None:
            with accelerator.autocast():
                logits = call(input_ids=batch, use_cache=False).logits
        else:
            logits = call(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        B, T = batch.shape
        sums[0] += float(loss)
        sums[1] += B * (T - 1)
        sums[2] += B * T
        kept_rows = [layer.mod_state.last_keep.sum(-1).tolist() for layer in layers]
        slot_rows = [  # the experts' slots kept tokens ran, where a router drops slots too (noop-expert)
            None if layer.mod_state.last_slots is None else layer.mod_state.last_slots.sum(-1).tolist()
            for layer in layers
        ]
        for row in range(B):
            kept = {
                i: int(k[row]) if s is None else (int(k[row]), int(s[row]))
                for i, k, s in zip(indices, kept_rows, slot_rows)
            }
            sums[3] += sequence_flops(table, T, kept)
            sums[4] += sequence_flops(table, T)
        if converted:
            sums[3] += sum(m.extra_flops() for m in model.modules() if isinstance(m, Router))
        for j, layer in enumerate(layers):
            sums[5 + 2 * j] += float(layer.mod_state.last_keep.sum())
            sums[6 + 2 * j] += layer.mod_state.last_keep.numel()
    model.train(was_training)
    if runner is not None:
        runner.train(was_training)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(device), reduction="sum").cpu()
    loss = float(sums[0] / sums[1])
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": int(sums[1]),
        "kept_fraction": {str(i): float(sums[5 + 2 * j] / sums[6 + 2 * j]) for j, i in enumerate(indices)},
        "flops_per_token": float(sums[3] / sums[2]),
        "flops_ratio": float(sums[3] / sums[4]),
    }


# --- training ---------------------------------------------------------------------------------------
def run(
    cfg: LMAdaptConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
) -> dict:
    """Adapt, checkpoint, evaluate and write the run directory; returns the summary.

    `model` (optional) is an in-memory causal LM, converted or dense (then converted with `cfg`);
    it is trained in place. `tokenizer` goes with it (else byte-level ids). `blocks` (optional):
    the `[N, seq_len]` training and validation token blocks, already made (a benchmark that runs
    many variants on one corpus tokenises it once); `cfg.data` is then only recorded.
    `teacher` (optional, with `distill > 0`): the model to distill from, frozen here (a converted
    one through a dense copy), instead of the starting weights: a model whose layers were deleted
    before the run wants the original (its own starting weights are what the deletion broke).
    Not part of `config.yaml`: a resumed run must be given the same teacher again.
    The seed is set before conversion, so router initialisation repeats with `cfg.seed`.
    """
    from accelerate.utils import set_seed

    import modadapt

    if teacher is not None and not cfg.distill > 0:  # before the run directory is touched
        raise ModAdaptError("a teacher is given but distill is 0: set distill > 0 to distill from it.")
    if teacher is not None and cfg.teacher is not None:
        raise ModAdaptError("give the teacher once: as run(teacher=...) or as the teacher setting, not both.")
    if teacher is not None and teacher is model:
        raise ModAdaptError("the teacher is the model being trained: give a separate model (or a copy).")
    out = Path(cfg.output)
    with RunCheckpoint(cfg) as checkpoint:
        given = model is not None
        set_seed(cfg.seed)
        model, teacher, found_tokenizer, extras = build_model(cfg, model, teacher)
        check_seq_len(model, cfg.seq_len)
        tokenizer = tokenizer if given else found_tokenizer
        if blocks is not None:
            train_blocks, valid_blocks = blocks
            if (
                train_blocks.dim() != 2
                or train_blocks.shape[1] != cfg.seq_len
                or valid_blocks.shape[1:] != train_blocks.shape[1:]
            ):
                raise ModAdaptError(
                    f"blocks must be [N, seq_len={cfg.seq_len}] token tensors, got "
                    f"{tuple(train_blocks.shape)} and {tuple(valid_blocks.shape)}."
                )
        else:
            train_blocks, valid_blocks = load_blocks(cfg, tokenizer, model.config.vocab_size)
        set_seed(cfg.seed)

        accelerator = make_accelerator(cfg, fsdp=True, gradient_accumulation_steps=cfg.grad_accum)
        inner = model
        if cfg.router_init == "update-size" and not cfg.resume:  # a resumed run restores its routers
            fit_routers(
                model, spread_blocks(train_blocks, cfg.router_init_blocks), cfg.eval_batch_size, accelerator.device
            )
        dense_table = flops_table(inner)  # the dense model's FLOPs, before LoRA adds matrices to the layers
        trained = select_trainable(model, cfg)
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(trained, params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps, cfg.max_steps))
        sharded = is_fsdp(accelerator)
        # FSDP shards the model in place: the main process keeps a weightless copy to save the gathered weights in.
        skeleton = meta_copy(trained, inner) if sharded and accelerator.is_main_process else None
        summary, prepared = _train(
            cfg,
            accelerator,
            trained,
            inner,
            teacher,
            dense_table,
            optimizer,
            scheduler,
            params,
            train_blocks,
            valid_blocks,
            checkpoint,
        )
        if sharded:
            full = accelerator.get_state_dict(prepared)  # every process takes part; the main one gets it all
            if accelerator.is_main_process:
                trained, inner = skeleton
                load_full_state(trained, full)
        if accelerator.is_main_process:
            if cfg.train == "lora":
                trained.merge_and_unload()
            if state_of(inner) is None:  # router: none
                save_unconverted(inner, out / "model", marker="config.json", overwrite=True, extra_files=extras)
            else:
                modadapt.save(inner, out / "model", overwrite=True, extra_files=extras)
            if given and tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(out / "model"))
            pruned = read_record(cfg.model) if not given and Path(cfg.model).is_dir() else None
            if pruned is not None:  # the layers `modadapt prune` deleted: FLOPs of the original
                summary["prune"] = pruned
            write_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        accelerator.wait_for_everyone()
    return summary


def _train(
    cfg,
    accelerator,
    trained,
    inner,
    teacher,
    dense_table,
    optimizer,
    scheduler,
    params,
    train_blocks,
    valid_blocks,
    checkpoint,
) -> tuple[dict, nn.Module]:
    """Evaluate, train, evaluate: `(summary, prepared model)`.

    Under FSDP the model is sharded first (never whole on a device: what FSDP is for) and each
    evaluation runs on the shards, every process in step; the parameters to clip and hold are
    the sharded ones (FSDP replaces them)."""
    show = cfg.progress and accelerator.is_main_process
    sharded = is_fsdp(accelerator)
    converted_table = None
    if sharded:
        set_fsdp_wrap(accelerator, trained)
        converted_table = flops_table(inner)
        model, optimizer = accelerator.prepare(trained, optimizer)
        finish_fsdp_wrap(model)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        inner.to(accelerator.device)
    runner = model if sharded else None
    with original(inner, trained):
        dense_eval = evaluate(
            inner,
            valid_blocks,
            batch_size=cfg.eval_batch_size,
            accelerator=accelerator,
            progress=show,
            desc="eval dense",
            table=dense_table,
            runner=runner,
        )
    before = evaluate(
        inner,
        valid_blocks,
        batch_size=cfg.eval_batch_size,
        accelerator=accelerator,
        progress=show,
        desc="eval converted",
        table=converted_table,
        runner=runner,
    )
    if teacher is not None:
        teacher.to(accelerator.device)

    def teacher_logits(batch):
        if teacher is not None:
            return teacher(input_ids=batch, use_cache=False).logits.float()
        with original(inner, trained):
            return (runner or inner)(input_ids=batch, use_cache=False).logits.float()

    if not sharded:
        model, optimizer = accelerator.prepare(trained, optimizer)
    schedule = AdaptationSchedule(inner, capacity_warmup=cfg.capacity_warmup, router_steps=cfg.router_steps)
    accelerator.register_for_checkpointing(scheduler)
    T = cfg.distill_temperature

    # transformers adds `router_aux_loss_coef * aux_loss` of a mixture of experts to `outputs.loss`
    expert_coef = float(getattr(inner.config.get_text_config(decoder=True), "router_aux_loss_coef", 0.0) or 0.0)

    def lm_loss(model, batch, accelerator):
        """`outputs.loss` (routers' aux losses included; a mixture of experts' load-balancing
        loss too) + distill x KL; the parts logged apart."""
        target = None
        if cfg.distill > 0 and sharded and teacher is None:
            # the teacher is the sharded model itself: its forward first, not between the student's and its backward
            with torch.no_grad():
                target = teacher_logits(batch)
        outputs = model(input_ids=batch, labels=batch, use_cache=False)
        loss = outputs.loss
        aux = outputs.get("router_aux_loss")
        experts = outputs.get("aux_loss")  # a mixture of experts' load-balancing loss, also in `loss`
        expert_loss = expert_coef * float(experts.detach()) if experts is not None else 0.0
        parts = {
            "aux_loss": float(aux.detach()) if aux is not None else 0.0,
            "expert_loss": expert_loss,
            "lm_loss": float(loss.detach() - (aux.detach() if aux is not None else 0)) - expert_loss,
            "distill_loss": 0.0,
        }
        if cfg.distill > 0:
            if target is None:
                with torch.no_grad():
                    target = teacher_logits(batch)
            kl = distillation_kl(outputs.logits, target, T)
            parts["distill_loss"] = float(kl.detach())
            loss = loss + cfg.distill * kl
        return loss, parts

    result = train_loop(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_blocks,
        lm_loss,
        checkpoint,
        total_steps=cfg.max_steps,
        params=params,
        converted=inner if state_of(inner) is not None else None,
        max_bad_steps=cfg.max_bad_steps,
        schedule=schedule,
        logged=("lm_loss", "aux_loss", "expert_loss", "distill_loss"),
        desc="lm-adapt",
    )
    step, bad_steps, history, step_times = result.step, result.bad_steps, result.history, result.step_times
    cutoffs = calibrate_for_inference(inner, cfg, accelerator, train_blocks, runner)

    after = evaluate(
        inner,
        valid_blocks,
        batch_size=cfg.eval_batch_size,
        accelerator=accelerator,
        progress=show,
        desc="eval adapted",
        table=converted_table,
        runner=runner,
    )
    steady = sorted(step_times[min(5, len(step_times) // 2) :])  # the first steps compile / warm up
    step_s = steady[len(steady) // 2] if steady else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.seq_len
    return {
        "processes": accelerator.num_processes,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_step / step_s if step_s else None,
        "train_time_s": sum(step_times),
        "steps": step,
        "skipped_steps": bad_steps,
        "train": cfg.train,
        "trainable_parameters": sum(p.numel() for p in params),
        "final_train_loss": history["loss"][-1] if history["loss"] else None,
        "history": history,
        "valid_blocks": len(valid_blocks),
        "train_blocks": len(train_blocks),
        "seq_len": cfg.seq_len,
        "valid_ppl": {"dense": dense_eval["ppl"], "converted_before": before["ppl"], "converted_after": after["ppl"]},
        "valid_loss": {
            "dense": dense_eval["loss"],
            "converted_before": before["loss"],
            "converted_after": after["loss"],
        },
        "kept_fraction": {"before": before["kept_fraction"], "after": after["kept_fraction"]},
        "flops_per_token": {
            "dense": dense_eval["flops_per_token"],
            "converted_before": before["flops_per_token"],
            "converted_after": after["flops_per_token"],
        },
        "flops_ratio": after["flops_ratio"],
        "flops_ratio_before": before["flops_ratio"],
        "mod_config": state_of(inner).config_dict() if state_of(inner) else None,
        "calibrated_cutoffs": cutoffs,
        "sharding": "fsdp" if sharded else ("ddp" if accelerator.num_processes > 1 else "none"),
        **({"fsdp_units": fsdp_units(model)} if sharded else {}),
    }, model


def calibrate_for_inference(inner, cfg, accelerator, train_blocks, runner) -> dict | None:
    """`cfg.calibrate_blocks` training blocks, evenly spaced, through `modadapt.calibrate_cutoffs` on every
    process (the same blocks; the main process's cut-offs then go to all, so no float noise
    between processes can set them apart), under the run's autocast. Returns each
    layer's cut-off before (`training`: the running average) and after (`inference`), or None
    where nothing is calibrated (off, or no calibrated cut-off to set)."""
    from ..convert import mod_layers
    from ..cutoffs import calibrate_cutoffs, calibrates

    targets = [layer for layer in mod_layers(inner) if calibrates(layer.router)] if state_of(inner) else []
    if not cfg.calibrate_blocks or not targets:
        return None
    training = {str(t.mod_state.index): float(t.router.causal_threshold(t.mod_state.index)) for t in targets}
    batches = spread_blocks(train_blocks, cfg.calibrate_blocks).split(cfg.eval_batch_size)
    with accelerator.autocast():
        found = calibrate_cutoffs(inner, batches, runner=runner)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        order = sorted(found)
        values = broadcast(torch.tensor([found[i] for i in order], device=accelerator.device), from_process=0)
        routers = {layer.mod_state.index: layer.router for layer in targets}
        for i, value in zip(order, values.tolist()):
            routers[i].set_cutoff(i, value)
            found[i] = value
    return {"training": training, "inference": {str(i): cut for i, cut in found.items()}}


def evaluate_saved(
    directory: str,
    data: str,
    *,
    seq_len: int | None = None,
    max_tokens: int = 0,
    dense: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of a `modadapt.save` directory on local text (``modadapt eval``); with `dense`,
    of its dense model (`modadapt.unload`) instead. A plain transformers directory (a pruned model,
    an original, a ``router: none`` run's) is its own dense model. `max_tokens` caps the text (0: all).

    An lm-adapt run directory, or its ``model/``, is evaluated as the run did: `seq_len` defaults
    to the run's (else 256), so the perplexity matches its summary. `device` defaults to CUDA when
    there is one, as the recipes do.
    """
    import modadapt

    from ..metrics.calibration import model_tokenizer
    from ..persistence import META_FILE

    path = Path(directory)
    inside = path / "model"  # a run directory
    if not any((path / f).is_file() for f in (META_FILE, "config.json")) and (inside / "config.json").is_file():
        path = inside
    converted = (path / META_FILE).is_file()
    if not converted and not (path / "config.json").is_file():
        raise ModAdaptError(
            f"{directory} is neither a directory saved by modadapt.save (no {META_FILE}) nor a transformers "
            "model directory (no config.json)."
        )
    if seq_len is None:
        seq_len = run_setting(path.parent, "seq_len") or 256
    if seq_len < 2 or max_tokens < 0 or batch_size < 1:
        raise ModAdaptError("seq_len must be >= 2, max_tokens >= 0 and batch_size >= 1.")
    device = eval_device(device)
    model = modadapt.load(path, device=device) if converted else load_model(str(path), converted=False).model.to(device)
    if not is_causal_lm(model):
        raise ModAdaptError(
            f"eval scores causal language models, timm ViTs and LLaVA models; {directory} holds a "
            f"{type(model).__name__}."
        )
    check_seq_len(model, seq_len)
    ids = tokenize(read_corpus(data), model_tokenizer(str(path)), model.config.vocab_size)
    blocks = pack(ids[:max_tokens] if max_tokens else ids, seq_len, data)
    if dense and converted:
        modadapt.unload(model)
    result = evaluate(model, blocks, batch_size=batch_size, progress=progress)
    record = read_record(path)
    if record is not None:  # the layers `modadapt prune` deleted (FLOPs of the original)
        result["prune"] = record
    return {
        **result,
        "model": "converted" if converted and not dense else "dense",
        "blocks": len(blocks),
        "seq_len": seq_len,
        "device": str(device),
    }


# --- lm-eval ----------------------------------------------------------------------------------------
def lm_eval_model(model: nn.Module, tokenizer: Any = None, **kwargs: Any) -> Any:
    """An lm-eval model wrapping the in-memory (converted) model: ``HFLM(pretrained=model, tokenizer=...)``.

    `tokenizer` defaults to the model's own (`modadapt.tokenizer.tokenizer_for`): the one saved in
    the directory it was loaded from, else a byte-level preset's byte tokenizer.

    Loglikelihood tasks (multiple choice, perplexity) score a whole sequence in one forward;
    generation tasks prefill and then decode with the KV cache. The default
    ``inference_routing="causal"`` makes both route every token by its causal rule, so a
    continuation is scored the same way it would be generated; with ``"topk"`` loglikelihood tasks
    would see look-ahead routing that decoding cannot reproduce.
    """
    from ..tokenizer import tokenizer_for

    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ModAdaptError("lm_eval_model needs lm-eval; `pip install lm-eval` (or modadapt[test]).") from None
    if tokenizer is None:
        tokenizer = tokenizer_for(model)
    if tokenizer is None:
        raise ModAdaptError(
            "lm-eval needs the model's tokenizer and this model has none saved with it; pass "
            "tokenizer= (e.g. AutoTokenizer.from_pretrained of the original model)."
        )
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


# --- command line -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, LMAdaptConfig)
    parser.add_argument(
        "--router-arg",
        dest="router_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one router argument (merged into router_kwargs)",
    )


def main(args: argparse.Namespace) -> int:
    overrides = overrides_from(args, LMAdaptConfig)
    if args.router_arg:
        overrides["router_kwargs"] = {**(overrides["router_kwargs"] or {}), **parse_router_args(args.router_arg)}
    cfg = LMAdaptConfig.resolve(args.config, overrides)
    summary = run(cfg)
    if launched_rank():  # one report for a run of several processes, from the first
        return 0
    ppl = summary["valid_ppl"]
    if summary["mod_config"] is None:  # router: none
        print(f"valid perplexity: {ppl['converted_before']:.3f} -> adapted {ppl['converted_after']:.3f}")
        if "prune" in summary:
            print(f"pruned: {describe(summary['prune'])}")
        print(f"{summary['skipped_steps']} steps skipped (the model trained unconverted: no routing)")
    else:
        print(
            f"valid perplexity: dense {ppl['dense']:.3f}  converted {ppl['converted_before']:.3f} -> "
            f"adapted {ppl['converted_after']:.3f}"
        )
        kept = ", ".join(f"{k}: {v:.3f}" for k, v in summary["kept_fraction"]["after"].items())
        print(f"kept fraction per layer: {kept}")
        print(
            f"FLOPs per token: MoD / dense = {summary['flops_ratio']:.3f}  ({summary['skipped_steps']} steps skipped)"
        )
    if summary.get("step_time_s"):
        print(
            f"training: {summary['step_time_s'] * 1000:.1f} ms per step (median), {summary['tokens_per_s']:,.0f} "
            f"tokens/s on {summary['processes']} process(es)"
        )
    print(f"run directory: {cfg.output}", file=sys.stderr)
    return 0
