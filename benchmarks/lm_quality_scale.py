"""Quality at a realistic scale: does learned routing beat deleting layers at the same FLOPs?

1. **Tokenizer**: a byte-level BPE (8192 tokens) trained with `tokenizers` on the training split
   of ``tech-docs``, saved as a `transformers` fast tokenizer beside the model.
2. **Pretrained model**: a 12-layer, 97M-parameter Llama pretrained from scratch for two epochs of
   the training split (bf16 autocast, compiled on CUDA, seeded, deterministic algorithms). Its
   valid loss and the tokenizer's hash are recorded in ``results/lm_quality_scale_pretrain.json``
   with the pretraining curve; a rebuild on another machine must reproduce them, else the run
   stops (``--new-pretrained`` records a new model instead).
3. **Compute levels**: the FLOPs per token of the model with 4 and with 6 of its 12 layers deleted
   (about 0.70 and 0.55 of dense). Every variant at a level is sized to those FLOPs: a router's
   capacity is solved from the FLOPs model (`modadapt.metrics.flops.sequence_flops`), the
   static baselines delete that many whole layers.
4. **Variants**, each adapted by the `lm-adapt` recipe with one budget (steps, batch, learning
   rate schedule, data order, everything trains): learned routers ``topk``, ``threshold-p``,
   ``attention``; the control ``random``; ``dense-adapt`` (the dense model given the same
   training); layer deletion ``layer-drop-even`` / ``-cosine`` (ShortGPT: highest input/output
   similarity) / ``-arank`` (lowest attention-map rank), healed the same way. Routers sit on every
   other layer, on all layers but the first, or on the layers ARank / cosine rank most redundant;
   ``hybrid*`` variants delete fewer layers than deletion and route some of the rest.
   Ablations change one thing each (distillation, capacity warm-up, ...); the budget ablation
   (``*-2x``) doubles the steps, and the goals compare equal budgets only.
5. **Metrics** per run and seed: valid and out-of-domain perplexity, FLOPs per token relative to
   dense, kept fraction per layer, adaptation tokens and time, and next-token agreement with the
   dense model on its own greedy continuations (32 tokens after 64 valid prompts).

Records go to ``--out`` (default ``results/lm_quality_scale.json``) with a Markdown table beside
it (means and standard deviations over seeds, goals judged). Runs are resumable: records are
kept per run in ``WORK/records`` and merged, so a later call (``--append``) adds seeds and
variants. ``--jobs N`` runs N adaptations at once on one GPU (an eager 97M-parameter step leaves
most of an H200 idle).

    python benchmarks/lm_quality_scale.py --tiny                     # CPU: the whole pipeline, tiny
    python benchmarks/lm_quality_scale.py --data-dir DIR --jobs 4    # GPU: the real run
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from layer_drop import evenly_spaced, most_redundant, remove_attention, remove_layers  # noqa: E402

import modadapt  # noqa: E402
from modadapt.config import evenly_count  # noqa: E402
from modadapt.metrics.flops import flops_table, sequence_flops  # noqa: E402
from modadapt.prune import evenly_for_flops, flops_ratio  # noqa: E402
from modadapt.recipes.lm_adapt import NO_ROUTER, LMAdaptConfig, evaluate, pack, run, spread_blocks, tokenize  # noqa: E402
from modadapt.recipes.training import lr_schedule  # noqa: E402
from modadapt.routers.base import kept_count  # noqa: E402

DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "tech-docs"
RESULTS = ROOT / "results" / "lm_quality_scale.json"
PRETRAIN_RECORD = ROOT / "results" / "lm_quality_scale_pretrain.json"
SPLITS = ("train", "valid", "ood")
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Scale:
    """Every size of the benchmark in one place (``--tiny`` replaces it with `TINY`)."""

    vocab: int = 8192
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 2048
    seq_len: int = 1024
    pretrain_epochs: int = 2
    pretrain_batch: int = 32
    pretrain_lr: float = 8e-4
    pretrain_warmup: int = 100
    adapt_steps: int = 250
    adapt_batch: int = 32
    adapt_lr: float = 3e-4
    adapt_warmup: int = 25
    eval_blocks: int = 512  # valid and ood blocks evaluated, evenly spaced over each split
    calibration_samples: int = 32  # train blocks that the layer metrics are computed on ...
    calibration_len: int = 256  # ... their first tokens (ARank takes one SVD per head and map)
    prompts: int = 64
    prompt_len: int = 64
    generated: int = 32
    text_chars: int = 0  # 0: whole splits; else the first N characters of each (tiny)


TINY = Scale(
    vocab=300,
    hidden=32,
    layers=6,
    heads=4,
    intermediate=64,
    seq_len=32,
    pretrain_epochs=1,
    pretrain_batch=8,
    pretrain_lr=3e-3,
    pretrain_warmup=2,
    adapt_steps=2,
    adapt_batch=4,
    adapt_warmup=0,
    eval_blocks=8,
    calibration_samples=4,
    calibration_len=16,
    prompts=4,
    prompt_len=8,
    generated=4,
    text_chars=30_000,
)

LEVELS = {"0.70": 0.70, "0.55": 0.55}  # nominal FLOPs ratios; each is met by deleting whole layers
LEARNED = ("topk", "threshold-p", "attention")
STATIC = ("layer-drop-even", "layer-drop-cosine", "layer-drop-arank", "attention-drop-even")
ATTENTION_DROP = "attention-drop-even"  # deletes evenly spaced attention sublayers, not whole layers


@dataclass(frozen=True)
class Variant:
    """One row of the table: what is adapted, and how its recipe differs from the shared one.

    `router` is a router name, ``dense-adapt`` or a `STATIC` deletion. `placement` (routers): every
    other layer, all but the first, or as many layers as every-other that the ``arank`` / ``cosine``
    metric ranks most redundant, or ``even+N`` (N more evenly spaced layers than deletion removes at
    the level). `recipe`: lm-adapt options (``capacity_warmup`` and
    ``router_steps`` as fractions of the adaptation steps). `capacities`: per-layer capacities in
    proportion to a layer's need by that metric (ARank; cosine: 1 - similarity, ShortGPT's block
    influence), scaled to the level's FLOPs, instead of one capacity for all layers. `budget`:
    adaptation steps as a multiple of the shared budget (> 1 only in the budget ablation, which the
    goals leave out: they compare equal budgets). `scope`: what the routers route (`ModConfig.scope`);
    with ``attention`` an ``even+N`` placement counts from the attention sublayers that
    ``attention-drop-even`` deletes at the level. `spare` (hybrid: deletion, then routing): delete
    `spare` fewer evenly spaced layers than deletion removes at the level, then route an ``even+N``
    placement of the layers left, N more than `spare`; the capacity is solved for the level's FLOPs
    of the whole model, and the goals count a hybrid as a learned router."""

    router: str
    placement: str = "-"
    recipe: dict = field(default_factory=dict)
    router_kwargs: dict = field(default_factory=dict)
    capacities: str | None = None
    budget: int = 1
    level: str | None = None  # only this compute level (elsewhere it repeats another variant)
    scope: str = "block"
    spare: int = 0

    def __post_init__(self):
        # the layer scores and capacities index the whole model, not the one deletion leaves
        if self.spare and (not self.placement.startswith("even+") or self.capacities or self.scope != "block"):
            raise ValueError("a hybrid (spare > 0) routes whole blocks on an even+N placement, one capacity")

    @property
    def deletes_then_distills(self) -> bool:
        """Whether the run distills a model whose layers were deleted before it started: its
        teacher must be given (the dense model), since the recipe's default teacher, the run's
        starting weights, would be the broken model itself (`DENSE_TEACHER`)."""
        return bool(self.recipe.get("distill")) and (self.router in STATIC or self.spare > 0)


VARIANTS = {
    "dense-adapt": Variant("dense-adapt"),
    "topk": Variant("topk", "every-other"),
    "threshold-p": Variant("threshold-p", "every-other"),
    "attention": Variant("attention", "every-other"),
    "random": Variant("random", "every-other"),
    "topk-all": Variant("topk", "all-but-first"),
    "threshold-p-all": Variant("threshold-p", "all-but-first"),
    "random-all": Variant("random", "all-but-first"),
    "topk-arank": Variant("topk", "arank"),
    "topk-cosine": Variant("topk", "cosine"),
    **{name: Variant(name) for name in STATIC},
    # ablations of the recipe: one change to the same budget
    "topk-distill": Variant("topk", "every-other", recipe={"distill": 1.0}),
    "threshold-p-all-distill": Variant("threshold-p", "all-but-first", recipe={"distill": 1.0}),
    "layer-drop-even-distill": Variant("layer-drop-even", recipe={"distill": 1.0}),
    "layer-drop-cosine-distill": Variant("layer-drop-cosine", recipe={"distill": 1.0}),
    "topk-warmup": Variant("topk", "every-other", recipe={"capacity_warmup": 0.5}),
    "threshold-p-all-warmup": Variant("threshold-p", "all-but-first", recipe={"capacity_warmup": 0.5}),
    "topk-routers-first": Variant("topk", "every-other", recipe={"router_steps": 0.2}),
    "topk-tanh": Variant("topk", "every-other", router_kwargs={"gate": "tanh"}),
    "topk-capacities-cosine": Variant("topk", "every-other", capacities="cosine"),
    "topk-all-capacities-cosine": Variant("topk", "all-but-first", capacities="cosine"),
    "topk-all-capacities-arank": Variant("topk", "all-but-first", capacities="arank"),
    # routers that start from what their layer does, or learn faster (the routers barely beat random)
    "topk-fit": Variant("topk", "every-other", recipe={"router_init": "update-size"}),
    "topk-distill-fit": Variant("topk", "every-other", recipe={"distill": 1.0, "router_init": "update-size"}),
    "threshold-p-all-distill-fit": Variant(
        "threshold-p", "all-but-first", recipe={"distill": 1.0, "router_init": "update-size"}
    ),
    "topk-router-lr10": Variant("topk", "every-other", recipe={"router_lr_scale": 10.0}),
    # soft deletion: routers on one or two more evenly spaced layers than deletion removes
    "topk-even+1": Variant("topk", "even+1"),
    "random-even+1": Variant("random", "even+1"),
    "topk-distill-even+1": Variant("topk", "even+1", recipe={"distill": 1.0}),
    "topk-distill-even+2": Variant("topk", "even+2", recipe={"distill": 1.0}, level="0.55"),  # 0.70: every other
    "threshold-p-distill-even+1": Variant("threshold-p", "even+1", recipe={"distill": 1.0}),
    # the best router with per-layer capacities by cosine need (they helped every-other topk a little)
    "topk-distill-even+1-capacities-cosine": Variant("topk", "even+1", recipe={"distill": 1.0}, capacities="cosine"),
    # ... and with the causal rule a stop-gradient predictor's (the training-time top-k beat the causal rule)
    "topk-distill-even+1-predictor": Variant(
        "topk", "even+1", recipe={"distill": 1.0}, router_kwargs={"causal_rule": "predictor"}
    ),
    # does the gap close with training? the best router and the best deletion, twice the steps
    "topk-distill-2x": Variant("topk", "every-other", recipe={"distill": 1.0}, budget=2),
    "threshold-p-all-distill-2x": Variant("threshold-p", "all-but-first", recipe={"distill": 1.0}, budget=2),
    "layer-drop-even-2x": Variant("layer-drop-even", budget=2),
    "topk-distill-even+1-2x": Variant("topk", "even+1", recipe={"distill": 1.0}, budget=2),
    # hybrids: delete two layers fewer than deletion, route 3 (or 4) of the rest at the level's FLOPs
    "hybrid2-topk-distill-even+1": Variant("topk", "even+1", recipe={"distill": 1.0}, spare=2),
    "hybrid2-topk-distill-even+2": Variant("topk", "even+2", recipe={"distill": 1.0}, spare=2),
    # sublayers: routers on the attention only, one more than attention deletion removes
    "topk-distill-attention-even+1": Variant("topk", "even+1", recipe={"distill": 1.0}, scope="attention"),
}
# `--variants core`: the comparison the issue asks for (three seeds each), and the best router found
CORE = (
    "dense-adapt",
    "topk",
    "threshold-p",
    "attention",
    "random",
    "topk-all",
    "threshold-p-all",
    "random-all",
    "topk-arank",
    "topk-cosine",
    "layer-drop-even",
    "layer-drop-cosine",
    "layer-drop-arank",
    "attention-drop-even",
    "topk-distill",
    "topk-distill-even+1",
)
STEP_OPTIONS = ("capacity_warmup", "router_steps")  # given as fractions of the adaptation steps
# lm-adapt options every run sets unless its variant changes them: the recipe as these records were
# measured with (its defaults have since become the best setting found here, distillation on);
# `calibrate_blocks` is part of what the cut-off rules ``inference`` and ``spread`` (`CUTOFF_RULE`) mean
BASE_RECIPE = {"distill": 0.0, "calibrate_blocks": 32}


def recipe_options(variant: Variant, steps: int) -> dict:
    """The variant's lm-adapt options, step counts resolved (at least 1, less than `steps`)."""
    return {
        key: min(steps - 1, max(1, round(value * steps))) if key in STEP_OPTIONS else value
        for key, value in variant.recipe.items()
    }


THRESHOLD_ALPHA = 0.1  # threshold-p's load-loss weight (the small-scale benchmark's best)


# --- data and tokenizer ------------------------------------------------------------------------------
def read_split(data_dir: Path, split: str, chars: int) -> str:
    path = data_dir / f"{split}.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; pass --data-dir (a copy of the tech-docs corpus)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read(chars) if chars else handle.read()


def train_tokenizer(text: str, vocab: int, directory: Path):
    """A byte-level BPE trained on `text`, saved to `directory` as a `transformers` fast
    tokenizer (``<|endoftext|>`` is its only special token, as in GPT-2). Deterministic: the
    same text gives the same ``tokenizer.json`` on any number of threads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    step = 1 << 20
    backend.train_from_iterator((text[i : i + step] for i in range(0, len(text), step)), trainer, length=len(text))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS, model_max_length=1 << 30
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(args: argparse.Namespace, scale: Scale, work: Path) -> dict:
    """Tokenizer and token blocks, made once per work directory (``WORK/data.pt``)."""
    from transformers import AutoTokenizer

    cache, tok_dir = work / "data.pt", work / "tokenizer"
    if cache.is_file() and (tok_dir / "tokenizer.json").is_file():
        return {**torch.load(cache), "tokenizer": AutoTokenizer.from_pretrained(str(tok_dir))}
    began = time.time()
    texts = {split: read_split(Path(args.data_dir), split, scale.text_chars) for split in SPLITS}
    tokenizer = train_tokenizer(texts["train"], scale.vocab, tok_dir)
    ids = {split: tokenize(text, tokenizer, scale.vocab) for split, text in texts.items()}
    blocks = {split: pack(ids[split], scale.seq_len, split) for split in SPLITS}
    valid = spread_blocks(blocks["valid"], scale.eval_blocks)  # (the splits are sorted by package)
    data = {
        "train": blocks["train"],
        "valid": valid,
        "ood": spread_blocks(blocks["ood"], scale.eval_blocks),
        "prompts": spread_blocks(blocks["valid"], scale.prompts)[:, : scale.prompt_len],
        "calibration": blocks["train"][
            torch.randperm(len(blocks["train"]), generator=torch.Generator().manual_seed(0))[
                : scale.calibration_samples
            ]
        ],
        "stats": {
            "characters": {s: len(t) for s, t in texts.items()},
            "tokens": {s: len(i) for s, i in ids.items()},
            "blocks": {s: len(b) for s, b in blocks.items()},
            "calibration_len": scale.calibration_len,
            "tokenizer_sha256": file_sha256(tok_dir / "tokenizer.json"),
            "prepare_s": time.time() - began,
        },
    }
    torch.save(data, cache)
    print(f"data: {data['stats']['tokens']} tokens ({data['stats']['prepare_s']:.0f}s)", flush=True)
    return {**data, "tokenizer": tokenizer}


# --- the pretrained dense model ------------------------------------------------------------------------
def build_dense(scale: Scale, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=scale.vocab,
        hidden_size=scale.hidden,
        intermediate_size=scale.intermediate,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.heads,
        max_position_embeddings=max(2048, scale.seq_len),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token loss of `model` on `blocks` in eval mode (bf16 autocast on CUDA)."""
    with autocast(device):
        return evaluate(model, blocks.to(device), batch_size=batch)["loss"]


def pretrain(model: nn.Module, data: dict, scale: Scale, device: torch.device, seed: int) -> dict:
    """Dense pretraining: AdamW, warm-up then cosine, a fixed permutation of the blocks per epoch,
    bf16 autocast and `torch.compile` on CUDA, deterministic algorithms. Returns the curve."""
    train = data["train"]
    steps_per_epoch = len(train) // scale.pretrain_batch
    steps = scale.pretrain_epochs * steps_per_epoch
    model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:  # strict: SDPA then takes flash attention's deterministic backward, never cuDNN's
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=scale.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(scale.pretrain_warmup, steps))
    step_fn = torch.compile(model) if cuda else model
    log_every = max(1, steps // 100)
    curve = {
        "step": [],
        "train_loss": [],
        "valid_step": [],
        "valid_loss": [],
        "tokens_per_step": scale.pretrain_batch * scale.seq_len,
        "steps": steps,
        "deterministic": "strict" if cuda else "cpu",
    }

    def forward_backward(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            loss = step_fn(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        return loss

    running = torch.zeros((), device=device)
    began, step = time.time(), 0
    for epoch in range(scale.pretrain_epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(steps_per_epoch):
            batch = train[order[i * scale.pretrain_batch : (i + 1) * scale.pretrain_batch]].to(
                device, non_blocking=True
            )
            try:
                loss = forward_backward(batch)
            except RuntimeError as error:  # an op without a deterministic kernel: say so, go on
                if step or "deterministic" not in str(error):
                    raise
                torch.use_deterministic_algorithms(True, warn_only=True)
                curve["deterministic"] = f"warn-only: {str(error).splitlines()[0][:200]}"
                print(f"pretrain: not fully deterministic ({curve['deterministic']})", flush=True)
                optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(batch)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            step += 1
            if step % log_every == 0 or step == steps:
                count = log_every if step % log_every == 0 else step % log_every
                curve["step"].append(step)
                curve["train_loss"].append(float(running) / count)
                running.zero_()
            if step % max(1, steps // 8) == 0 or step == steps:
                model.eval()
                curve["valid_step"].append(step)
                curve["valid_loss"].append(mean_loss(model, data["valid"], scale.pretrain_batch, device))
                model.train()
                print(
                    f"pretrain step {step}/{steps}: train {curve['train_loss'][-1]:.4f} valid "
                    f"{curve['valid_loss'][-1]:.4f} ({time.time() - began:.0f}s)",
                    flush=True,
                )
    curve["pretrain_s"] = time.time() - began
    curve["tokens_per_s"] = steps * curve["tokens_per_step"] / curve["pretrain_s"]
    return curve


def round_to_bf16(model: nn.Module) -> None:
    """Round the weights to bf16 in place, so the bf16 files we save reload as exactly this model."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16))


def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()


def dense_eval(model: nn.Module, data: dict, scale: Scale, device: torch.device) -> dict:
    valid = mean_loss(model, data["valid"], scale.pretrain_batch, device)
    ood = mean_loss(model, data["ood"], scale.pretrain_batch, device)
    return {"valid_loss": valid, "ood_loss": ood, "valid_ppl": math.exp(valid), "ood_ppl": math.exp(ood)}


def pretrained_model(args: argparse.Namespace, scale: Scale, data: dict, work: Path, device: torch.device):
    """The pretrained dense model (``WORK/pretrained``, with its tokenizer), built when missing.
    A rebuild is checked against the recorded valid loss and tokenizer (not with ``--tiny``)."""
    from transformers import LlamaForCausalLM

    directory = work / "pretrained"
    record_file = directory / "pretrain_record.json"
    if record_file.is_file():
        model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa")
        return model, json.loads(record_file.read_text())
    model = build_dense(scale, args.seed)
    curve = pretrain(model, data, scale, device, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the adaptation workers share the device
    round_to_bf16(model)
    model.eval()
    record = {
        "model": {"params": sum(p.numel() for p in model.parameters()), **asdict(scale)},
        "data": data["stats"],
        "seed": args.seed,
        **dense_eval(model, data, scale, device),
        "weights_sha256": weights_sha256(model),
        "curve": curve,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    check_rebuild(args, record)
    model.to(torch.bfloat16).save_pretrained(str(directory))
    model.float()
    data["tokenizer"].save_pretrained(str(directory))
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"pretrained: {record['model']['params'] / 1e6:.1f}M parameters, valid ppl {record['valid_ppl']:.3f}, "
        f"ood ppl {record['ood_ppl']:.3f}, {curve['tokens_per_s']:,.0f} tokens/s",
        flush=True,
    )
    return model, record


REBUILD_TOLERANCE = 2e-3  # relative difference of the valid loss that still counts as the same model


def check_rebuild(args: argparse.Namespace, record: dict) -> None:
    """Stop when a rebuilt model is not the recorded one (tokenizer hash, valid loss)."""
    if args.tiny:
        return
    if args.new_pretrained or not PRETRAIN_RECORD.is_file():
        PRETRAIN_RECORD.parent.mkdir(parents=True, exist_ok=True)
        PRETRAIN_RECORD.write_text(json.dumps(record, indent=2) + "\n")
        return
    known = json.loads(PRETRAIN_RECORD.read_text())
    same_tokenizer = known["data"]["tokenizer_sha256"] == record["data"]["tokenizer_sha256"]
    drift = abs(record["valid_loss"] - known["valid_loss"]) / known["valid_loss"]
    record["rebuild"] = {
        "recorded_valid_loss": known["valid_loss"],
        "relative_difference": drift,
        "same_weights": known.get("weights_sha256") == record["weights_sha256"],
    }
    if not same_tokenizer or drift > REBUILD_TOLERANCE:
        raise SystemExit(
            f"the rebuilt model is not the recorded one (tokenizer same: {same_tokenizer}, valid loss "
            f"{record['valid_loss']:.5f} vs {known['valid_loss']:.5f}); pass --new-pretrained to "
            "record a new one"
        )
    print(
        f"rebuilt model matches the record: valid loss {record['valid_loss']:.5f} vs {known['valid_loss']:.5f} "
        f"(weights identical: {record['rebuild']['same_weights']})",
        flush=True,
    )


# --- layer metrics, levels, placements ----------------------------------------------------------------
def layer_scores(model: nn.Module, data: dict, work: Path, device: torch.device) -> dict:
    """ARank and cosine per layer on the calibration blocks (``WORK/layer_scores.json``)."""
    from modadapt.metrics.report import score_layers

    path = work / "layer_scores.json"
    if path.is_file():
        return json.loads(path.read_text())
    model.to(device)
    calibration = data["calibration"][:, : data["stats"]["calibration_len"]]
    batches = [{"input_ids": b.to(device)} for b in calibration.split(4)]
    scores = {metric: [row["mean"] for row in score_layers(model, batches, metric)] for metric in ("arank", "cosine")}
    path.write_text(json.dumps(scores) + "\n")
    return scores


def dense_table(model: nn.Module, routed: list[int] = (), scope: str = "block") -> dict:
    """`flops_table` of the dense model, with a linear router (hidden -> 1) routing `scope` on the
    `routed` layers."""
    table = flops_table(model)
    for i in routed:
        table["layers"][i].update(router=model.config.hidden_size, scope=scope)
    return table


def drop_ratio(model: nn.Module, drop: list[int], tokens: int) -> float:
    """FLOPs per token of `model` without the layers `drop`, relative to the whole model."""
    return flops_ratio(model, drop, tokens)


def attention_drop_ratio(model: nn.Module, drop: list[int], tokens: int) -> float:
    """FLOPs per token of `model` without the attention sublayers of the layers `drop`."""
    table = dense_table(model, drop, "attention")
    for i in drop:
        table["layers"][i]["router"] = None  # deleted: nothing scores
    return sequence_flops(table, tokens, {i: 0 for i in drop}) / sequence_flops(flops_table(model), tokens)


def levels(model: nn.Module, tokens: int) -> dict:
    """Per level: how many layers deletion removes (the count whose FLOPs are nearest the
    nominal ratio), the FLOPs ratio that every variant of the level is sized to, and how many
    attention sublayers attention deletion removes to come nearest that ratio (None: even all
    of them, layer 0's aside, leave more than `MATCHED` above it)."""
    layers = model.config.num_hidden_layers
    out = {}
    for name, nominal in LEVELS.items():
        count = evenly_count(evenly_for_flops(model, nominal, tokens))  # what `modadapt prune --flops` deletes
        ratio = drop_ratio(model, evenly_spaced(count, layers), tokens)
        gap = {n: attention_drop_ratio(model, evenly_spaced(n, layers), tokens) - ratio for n in range(1, layers)}
        attention = min(gap, key=lambda n: abs(gap[n]))
        out[name] = {
            "drop": count,
            "flops_ratio": ratio,
            "attention_drop": attention if gap[attention] <= MATCHED else None,
        }
    return out


def placement_layers(placement: str, layers: int, scores: dict, drop: int) -> list[int]:
    """The routed layers; ``even+N``: as evenly spaced as deletion's, N more than the `drop` layers
    deletion removes at this level (soft deletion: those layers keep their busiest tokens)."""
    every_other = list(range(1, layers, 2))
    if placement == "every-other":
        return every_other
    if placement == "all-but-first":
        return list(range(1, layers))
    if placement.startswith("even+"):
        return evenly_spaced(min(layers - 1, drop + int(placement.removeprefix("even+"))), layers)
    return most_redundant(scores[placement], len(every_other), lower_is_redundant=placement == "arank")


def router_extra_flops(model: nn.Module, router: str, routed: list[int], tokens: int) -> int:
    """FLOPs per sequence that a router spends beyond a linear score: `attention` recomputes the
    preceding layer's attention map for each routed layer."""
    if router != "attention":
        return 0
    from modadapt.routers.attention import attention_router_flops

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return len(routed) * attention_router_flops(1, tokens, tokens, config.num_attention_heads, head_dim)


def solve_capacity(
    model: nn.Module, routed: list[int], target: float, tokens: int, extra: int = 0, scope: str = "block"
) -> float | None:
    """The largest capacity `k / tokens` whose FLOPs ratio (routers routing `scope` on `routed`,
    their linear scoring and `extra` FLOPs per sequence counted) does not exceed `target`; None
    when even one kept token exceeds it."""
    table = dense_table(model, routed, scope)
    full = sequence_flops(flops_table(model), tokens)
    ratio = lambda k: (sequence_flops(table, tokens, {i: k for i in routed}) + extra) / full  # noqa: E731
    if ratio(1) > target:
        return None
    low, high = 1, tokens
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ratio(mid) <= target else (low, mid - 1)
    return low / tokens


def layer_need(scores: dict, metric: str, routed: list[int]) -> list[float]:
    """How much each routed layer changes its tokens by `metric`: ARank itself, or cosine's block
    influence 1 - similarity."""
    return [scores["arank"][i] if metric == "arank" else 1.0 - scores["cosine"][i] for i in routed]


def solve_capacities(
    model: nn.Module, routed: list[int], need: list[float], target: float, tokens: int
) -> dict[int, float] | None:
    """Per-layer capacities `min(1, s * need)` (at least one token) with the largest `s` whose FLOPs
    ratio does not exceed `target`; None when one token per layer already exceeds it."""
    table = dense_table(model, routed)
    full = sequence_flops(flops_table(model), tokens)

    def kept(scale: float) -> dict[int, int]:
        return {i: min(tokens, max(1, kept_count(min(1.0, scale * n), tokens))) for i, n in zip(routed, need)}

    if sequence_flops(table, tokens, kept(0.0)) / full > target:
        return None
    low, high = 0.0, 1.0 / min(need)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sequence_flops(table, tokens, kept(mid)) / full <= target else (low, mid)
    return {i: k / tokens for i, k in kept(low).items()}


# --- tasks -------------------------------------------------------------------------------------------
#: How new runs of the calibrated routers set their causal cut-off. Rules so far:
#: - ``row-mean`` (runs without the field, until 2026-12-01): training's running average of each
#:   row's top-k boundary averaged over rows; it kept 19.7% of the tokens at capacity 23.1%.
#: - ``pooled``: training's running average of the boundary pooled over the batch's rows
#:   (`modadapt.routers.base.topk_boundary`); still 21.8% at 23.1%, the later layers' inputs
#:   being those of top-k routing upstream.
#: - ``inference``: then, after training, set layer by layer under the causal rule
#:   (`modadapt.calibrate_cutoffs`, the recipe's `calibrate_blocks`) on the first 32 training
#:   blocks, all from the first package of the sorted split: on valid it kept 24.9% at 23.1%.
#: - ``spread``: the same on 32 training blocks spread evenly over the split (the recipe since
#:   2026-12-02, `spread_blocks`).
#: Each rule's runs form their own table rows (`row_label`), so seeds of two rules never average.
CUTOFF_RULE = "spread"


#: What a run that `Variant.deletes_then_distills` distills from. Until 2026-12-02 such runs
#: distilled from their own starting weights (the model with its layers deleted, what the recipe
#: copies by default); those records name no teacher and form rows of their own
#: (``~deleted-teacher``, `row_label`).
DENSE_TEACHER = "dense"


def calibrated(router: str) -> bool:
    """Whether `router` (a router name, or a static / dense variant's) decodes by a calibrated
    causal cut-off (`Router.causal_cutoff`): its runs depend on `CUTOFF_RULE`."""
    entry = modadapt.plugins.registry().entries["router"].get(router)
    return entry is not None and entry.obj.causal_cutoff is not None


def row_label(record: dict) -> str:
    """The table row a run belongs to: its variant, with ``~RULE`` for a calibrated router's run
    made with an earlier cut-off rule (``~row-mean`` where the record names none), and
    ``~deleted-teacher`` for a deletion distilled from itself (`DENSE_TEACHER`)."""
    rule = record.get("cutoff_rule", "row-mean")
    old = calibrated(record.get("router", "")) and rule != CUTOFF_RULE
    label = f"{record['variant']}~{rule}" if old else record["variant"]
    variant = VARIANTS.get(record["variant"])
    if variant is not None and variant.deletes_then_distills and "teacher" not in record:
        label += "~deleted-teacher"
    return label


def task_id(task: dict) -> str:
    """A run's name (its record file and run folder in WORK): a run with a recorded cut-off rule
    names it (``topk~pooled@0.70#s0``), and one with a given teacher too
    (``layer-drop-even-distill~dense-teacher@0.70#s0``), so it never collides with an earlier run of
    the same variant, level and seed, which keeps the name it was made with (``topk@0.70#s0``)."""
    rule = f"~{task['cutoff_rule']}" if "cutoff_rule" in task else ""
    teacher = f"~{task['teacher']}-teacher" if "teacher" in task else ""
    return f"{task['variant']}{rule}{teacher}@{task['level']}#s{task['seed']}"


def plan(
    model: nn.Module, scale: Scale, scores: dict, variants: list[str], seeds: list[int]
) -> tuple[list[dict], list[str]]:
    """Every (variant, level, seed) task in run order (all variants of a seed before the next
    seed), and notes on what cannot run (a placement that cannot reach a level's FLOPs)."""
    layers, T = model.config.num_hidden_layers, scale.seq_len
    tasks, notes = [], []
    for seed in seeds:
        for variant in variants:
            if variant == "dense-adapt":
                tasks.append({"variant": variant, "level": "1.00", "seed": seed})
                continue
            spec_of = VARIANTS[variant]
            for level, spec in levels(model, T).items():
                if spec_of.level not in (None, level):
                    continue
                task = {"variant": variant, "level": level, "seed": seed, "target_flops_ratio": spec["flops_ratio"]}
                attention = spec_of.router == ATTENTION_DROP or spec_of.scope == "attention"
                reference = spec["attention_drop"] if attention else spec["drop"]
                if reference is None:
                    if seed == seeds[0]:
                        notes.append(
                            f"{variant} at {level}: deleting every attention sublayer but layer 0's cannot "
                            f"reach FLOPs {spec['flops_ratio']:.3f}"
                        )
                    continue
                if spec_of.router in STATIC:
                    task["drop_count"] = reference
                else:
                    host, target, deleted = model, spec["flops_ratio"], []
                    if spec_of.spare:  # a hybrid routes what a smaller deletion leaves
                        if reference - spec_of.spare < 1:
                            if seed == seeds[0]:
                                notes.append(
                                    f"{variant} at {level}: deletion removes {reference} layers, so sparing "
                                    f"{spec_of.spare} of them deletes none (that is {spec_of.placement} routing)"
                                )
                            continue
                        deleted = evenly_spaced(reference - spec_of.spare, layers)
                        host = remove_layers(model, deleted)
                        target /= drop_ratio(model, deleted, T)  # the level is a ratio to the whole model
                        task["deleted_layers"] = deleted
                    routed = placement_layers(
                        spec_of.placement, layers - len(deleted), scores, spec_of.spare or reference
                    )
                    if spec_of.capacities:
                        capacities = solve_capacities(
                            host, routed, layer_need(scores, spec_of.capacities, routed), target, T
                        )
                        capacity = None if capacities is None else sum(capacities.values()) / len(capacities)
                    else:
                        capacities = None
                        capacity = solve_capacity(
                            host,
                            routed,
                            target,
                            T,
                            router_extra_flops(host, spec_of.router, routed, T),
                            spec_of.scope,
                        )
                    if capacity is None:
                        if seed == seeds[0]:
                            notes.append(
                                f"{variant} at {level}: routers on {spec_of.placement} layers {routed} cannot "
                                f"reach FLOPs {spec['flops_ratio']:.3f} (the dense layers alone exceed it)"
                            )
                        continue
                    task.update(
                        router=spec_of.router, placement=spec_of.placement, routed_layers=routed, capacity=capacity
                    )
                    if calibrated(spec_of.router):
                        task["cutoff_rule"] = CUTOFF_RULE
                    if capacities:
                        task["capacities"] = {str(i): c for i, c in capacities.items()}
                if spec_of.deletes_then_distills:
                    task["teacher"] = DENSE_TEACHER
                tasks.append(task)
    return tasks, notes


def static_drop(task: dict, scores: dict, layers: int) -> list[int]:
    kind = VARIANTS[task["variant"]].router.removeprefix("layer-drop-")
    if kind in ("even", ATTENTION_DROP):
        return evenly_spaced(task["drop_count"], layers)
    return most_redundant(scores[kind], task["drop_count"], lower_is_redundant=kind == "arank")


@torch.no_grad()
def reference_continuations(
    dense: nn.Module, prompts: torch.Tensor, scale: Scale, device: torch.device
) -> torch.Tensor:
    """The dense model's greedy continuations of the prompts: `[P, prompt_len + generated]`."""
    dense.to(device).eval()
    with autocast(device):
        out = dense.generate(
            prompts.to(device),
            attention_mask=torch.ones_like(prompts, device=device),
            max_new_tokens=scale.generated,
            min_new_tokens=scale.generated,
            do_sample=False,
            pad_token_id=0,
        )
    return out.cpu()


@torch.no_grad()
def agreement(model: nn.Module, sequences: torch.Tensor, prompt_len: int, device: torch.device) -> float:
    """Share of the generated positions where `model`'s greedy next token, given the dense model's
    continuation so far, is the dense model's token (eval mode: causal routing, as in decoding)."""
    model.eval()
    with autocast(device):
        logits = model(input_ids=sequences.to(device), use_cache=False).logits
    predicted = logits[:, prompt_len - 1 : -1].argmax(-1).cpu()
    return float((predicted == sequences[:, prompt_len:]).float().mean())


CAPACITY_ROUTERS = ("topk", "attention", "random")


def topk_routing_ppl(model: nn.Module, blocks: torch.Tensor, batch: int, device: torch.device) -> float:
    """Valid perplexity with the training-time top-k in eval mode instead of the causal rule: how
    much of a capacity router's gap to dense is its causal rule's."""
    from modadapt.mod_layer import state_of

    config = state_of(model).config
    config.inference_routing = "topk"
    try:
        return math.exp(mean_loss(model, blocks, batch, device))
    finally:
        config.inference_routing = "causal"


def at_training_cutoffs(model: nn.Module, blocks: torch.Tensor, batch: int, device: torch.device, cutoffs: dict):
    """Valid perplexity, FLOPs ratio and kept fraction with the cut-offs training left (the
    recipe's `calibrated_cutoffs["training"]`) instead of those set for inference after it: the
    same model both ways, so the rule's effect is paired. The model's cut-offs come back."""
    from modadapt.cutoffs import cutoffs_restored

    layers = {layer.mod_state.index: layer.router for layer in modadapt.mod_layers(model)}
    with cutoffs_restored(layers[int(i)] for i in cutoffs["training"]):
        for index, cut in cutoffs["training"].items():
            layers[int(index)].set_cutoff(int(index), cut)
        with autocast(device):
            result = evaluate(model, blocks.to(device), batch_size=batch)
    kept = result["kept_fraction"]
    return {
        "valid_ppl_training_cutoff": result["ppl"],
        "flops_ratio_training_cutoff": result["flops_ratio"],
        "kept_fraction_training_cutoff": sum(kept.values()) / len(kept),
    }


def run_task(task: dict, ctx: dict) -> dict:
    """Adapt one variant with the shared budget and measure it."""
    args, scale, dense, data, device = ctx["args"], ctx["scale"], ctx["dense"], ctx["data"], ctx["device"]
    layers = dense.config.num_hidden_layers
    out = Path(args.work) / "runs" / task_id(task).replace("@", "_").replace("#", "_")
    variant = VARIANTS[task["variant"]]
    steps = scale.adapt_steps * variant.budget
    options = recipe_options(variant, steps)
    routing, drop = {"router": NO_ROUTER}, None  # dense-adapt and deletion train unconverted
    deleted = task.get("deleted_layers", [])  # a hybrid's deletion before routing
    share = drop_ratio(dense, deleted, scale.seq_len)  # its FLOPs, relative to the whole model
    if variant.router == "dense-adapt":
        model = copy.deepcopy(dense)
    elif variant.router in STATIC:
        drop = static_drop(task, ctx["scores"], layers)
        model = (remove_attention if variant.router == ATTENTION_DROP else remove_layers)(dense, drop)
    else:
        model = remove_layers(dense, deleted) if deleted else copy.deepcopy(dense)
        kwargs = dict(variant.router_kwargs)
        if task["router"] == "threshold-p":
            kwargs.update(alpha=THRESHOLD_ALPHA, target=task["capacity"])
        if task["router"] == "random":  # the control's choice of tokens varies with the seed too
            kwargs["seed"] = task["seed"]
        routing = {
            "router": task["router"],
            "capacity": task["capacity"],
            "layers": ",".join(map(str, task["routed_layers"])),
            "router_kwargs": kwargs,
            "scope": variant.scope,
        }
        if task.get("capacities"):  # converted here, each layer's router given its own share
            torch.manual_seed(task["seed"])
            modadapt.convert(
                model,
                router=task["router"],
                capacity=task["capacity"],
                layers=task["routed_layers"],
                router_kwargs=kwargs,
                scope=variant.scope,
            )
            for layer in modadapt.mod_layers(model):
                layer.router.target_share = task["capacities"][str(layer.mod_state.index)]
    cfg = LMAdaptConfig(
        data=str(Path(args.data_dir) / "train.txt.gz"),
        valid_data=str(Path(args.data_dir) / "valid.txt.gz"),
        output=str(out),
        seq_len=scale.seq_len,
        batch_size=scale.adapt_batch,
        max_steps=steps,
        lr=scale.adapt_lr,
        warmup_steps=scale.adapt_warmup,
        train="all",
        mixed_precision="bf16" if device.type == "cuda" else "no",
        cpu=device.type == "cpu",
        eval_batch_size=scale.adapt_batch,
        progress=False,
        seed=task["seed"],
        **routing,
        **{**BASE_RECIPE, **options},
    )
    if out.exists():
        shutil.rmtree(out)
    began = time.time()
    teacher = dense if task.get("teacher") == DENSE_TEACHER else None  # else the recipe's: the starting weights
    summary = run(cfg, model=model, tokenizer=data["tokenizer"], blocks=(data["train"], data["valid"]), teacher=teacher)
    ood = mean_loss(model, data["ood"], scale.adapt_batch, device)
    record = {
        "variant": task["variant"],
        "level": task["level"],
        "seed": task["seed"],
        "params": sum(p.numel() for p in model.parameters()),
        "layers": layers - len(drop or deleted) if variant.router != ATTENTION_DROP else layers,
        "valid_ppl": summary["valid_ppl"]["converted_after"],
        "ood_ppl": math.exp(ood),
        "valid_ppl_before": summary["valid_ppl"]["converted_before"],
        "agreement": agreement(model, ctx["reference"], scale.prompt_len, device),
        "adapt_tokens": summary["steps"] * scale.adapt_batch * scale.seq_len,
        "adapt_steps": summary["steps"],
        "adapt_s": summary["train_time_s"],
        "wall_s": time.time() - began,
        "skipped_steps": summary["skipped_steps"],
        "final_train_loss": summary["final_train_loss"],
        "train_loss_start": sum(summary["history"]["loss"][:10]) / len(summary["history"]["loss"][:10]),
        "train_loss_end": sum(summary["history"]["loss"][-10:]) / len(summary["history"]["loss"][-10:]),
        "target_flops_ratio": task.get("target_flops_ratio", 1.0),
        "pretrained_valid_ppl": ctx["pretrain"]["valid_ppl"],
        "jobs": args.jobs,
        "command": ctx["command"],
    }
    record["recipe_options"] = options
    record["budget"] = variant.budget
    if "teacher" in task:  # a deleted model's run distills from the dense one (`DENSE_TEACHER`)
        record["teacher"] = task["teacher"]
    if drop is not None:  # kept fraction: of the layers (of the attention sublayers, for attention deletion)
        attention = variant.router == ATTENTION_DROP
        record.update(
            router=variant.router,
            placement=("attention " if attention else "") + ",".join(map(str, drop)),
            dropped_layers=drop,
            flops_ratio=(attention_drop_ratio if attention else drop_ratio)(dense, drop, scale.seq_len),
            kept_fraction=(layers - len(drop)) / layers,
        )
    elif task["variant"] == "dense-adapt":
        record.update(router="dense-adapt", placement="-", flops_ratio=1.0, kept_fraction=1.0)
    else:
        kept = summary["kept_fraction"]["after"]
        if "cutoff_rule" in task:
            record["cutoff_rule"] = task["cutoff_rule"]
        if deleted:  # routed layers are numbered in the model deletion left
            record["deleted_layers"] = deleted
        record.update(
            router=task["router"],
            placement=(f"delete {','.join(map(str, deleted))}, then " if deleted else "")
            + task["placement"]
            + ("" if variant.scope == "block" else f", {variant.scope}"),
            scope=variant.scope,
            routed_layers=task["routed_layers"],
            capacity=task["capacity"],
            flops_ratio=summary["flops_ratio"] * share,
            kept_fraction=sum(kept.values()) / len(kept),
            kept_fraction_per_layer=kept,
            router_kwargs=routing["router_kwargs"],
            capacities=task.get("capacities"),
        )
    if task.get("router") in CAPACITY_ROUTERS:  # also the training-time top-k (not causal: perplexity only)
        record["valid_ppl_topk_routing"] = topk_routing_ppl(model, data["valid"], scale.adapt_batch, device)
    if summary.get("calibrated_cutoffs"):  # the cut-offs set for inference after training, and training's
        record["cutoffs"] = summary["calibrated_cutoffs"]
        record.update(at_training_cutoffs(model, data["valid"], scale.adapt_batch, device, record["cutoffs"]))
        record["flops_ratio_training_cutoff"] *= share
    keep = task["variant"] in args.keep_models.split(",")  # e.g. for speed.py's speculative decoding
    for name in ("checkpoint",) if keep else ("checkpoint", "model"):  # 1.2 GB per run: 60 would fill the disk
        shutil.rmtree(out / name, ignore_errors=True)
    if keep:
        record["model_dir"] = str(out / "model")
    return record


# --- records, table, goals ------------------------------------------------------------------------------
def merge_records(args: argparse.Namespace, work: Path) -> list[dict]:
    """Records of earlier calls (``--append``: those in --out) with this work directory's runs."""
    records = {}
    if args.append and Path(args.out).is_file():
        records.update({task_id(r): r for r in json.loads(Path(args.out).read_text())})
    for path in sorted((work / "records").glob("*.json")):
        record = json.loads(path.read_text())
        records.setdefault(task_id(record), record)
    order = {name: i for i, name in enumerate(["dense", *VARIANTS])}
    return sorted(records.values(), key=lambda r: (r["level"], order.get(r["variant"], 99), r["seed"]))


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def aggregate(records: list[dict]) -> dict:
    """`{(level, variant): {metric: (mean, std), 'seeds': n, ...}}` over seeds."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["level"], row_label(r)), []).append(r)
    out = {}
    for key, rows in groups.items():
        stats = {
            m: mean_std([r[m] for r in rows])
            for m in ("valid_ppl", "ood_ppl", "flops_ratio", "kept_fraction", "agreement")
        }
        out[key] = {
            **stats,
            "seeds": len(rows),
            "router": rows[0]["router"],
            "placement": rows[0]["placement"],
            "budget": rows[0].get("budget", 1),
            "finite": all(math.isfinite(r["valid_ppl"]) and math.isfinite(r["ood_ppl"]) for r in rows),
            "skipped_steps": sum(r.get("skipped_steps", 0) for r in rows),
        }
    return out


MATCHED = 0.03  # FLOPs ratios closer than this count as matched
DIVERGED = 0.1  # nats: a training loss that rises this much more than dense-adapt's diverged
DIVERGED_DENSE = 1.05  # dense-adapt diverged: validation perplexity above this times the pretrained's
DIVERGED_ALLOWANCE = 0.5  # nats: at most this much of dense-adapt's rise is put down to the batches


def goals(records: list[dict]) -> list[tuple[str, str, bool]]:
    """(goal, what was measured, met) for each goal the records can answer."""
    table = {k: s for k, s in aggregate(records).items() if s["budget"] == 1}  # equal budgets only
    fmt = lambda s: f"{s[0]:.3f} ± {s[1]:.3f}"  # noqa: E731
    out = []
    for level in LEVELS:
        learned = {v: s for (lv, v), s in table.items() if lv == level and s["router"] in LEARNED}
        static = {v: s for (lv, v), s in table.items() if lv == level and s["router"] in STATIC}
        if not learned or not static:
            continue
        for metric, label in (("valid_ppl", "valid"), ("ood_ppl", "ood")):
            best_l = min(learned, key=lambda v: learned[v][metric][0])
            best_s = min(static, key=lambda v: static[v][metric][0])
            lm, ls = learned[best_l][metric]
            sm, ss = static[best_s][metric]
            seeds = min(learned[best_l]["seeds"], static[best_s]["seeds"])
            margin = max(ls, ss)
            out.append(
                (
                    f"FLOPs {level}: best learned router beats best static baseline on {label} ppl by > max std",
                    f"{best_l} {fmt(learned[best_l][metric])} vs {best_s} {fmt(static[best_s][metric])} "
                    f"({seeds} seed{'s' if seeds != 1 else ''})",
                    seeds >= 2 and lm + margin < sm,
                )
            )
    adapted = table.get(("1.00", "dense-adapt"))
    thresholds = {k: s for k, s in table.items() if s["router"] == "threshold-p" and s["flops_ratio"][0] <= 0.70 + 1e-9}
    if adapted and thresholds:
        key = min(thresholds, key=lambda k: thresholds[k]["valid_ppl"][0])
        ratio = thresholds[key]["valid_ppl"][0] / adapted["valid_ppl"][0]
        out.append(
            (
                "threshold-p within 2% of dense-adapt valid ppl at <= 0.70 FLOPs",
                f"{key[1]} at {key[0]}: {fmt(thresholds[key]['valid_ppl'])} = {ratio:.4f} x dense-adapt "
                f"{fmt(adapted['valid_ppl'])}, FLOPs {thresholds[key]['flops_ratio'][0]:.3f}",
                ratio <= 1.02,
            )
        )
    for (level, variant), s in table.items():
        if s["router"] not in LEARNED:
            continue
        control = next(
            (
                (k, c)
                for k, c in table.items()
                if k[0] == level and c["router"] == "random" and c["placement"] == s["placement"]
            ),
            None,
        )
        if control is None:
            continue
        matched = abs(control[1]["flops_ratio"][0] - s["flops_ratio"][0]) <= MATCHED
        out.append(
            (
                f"{variant} beats random at FLOPs {level}",
                f"{fmt(s['valid_ppl'])} vs {control[0][1]} {fmt(control[1]['valid_ppl'])} (FLOPs "
                f"{s['flops_ratio'][0]:.3f} vs {control[1]['flops_ratio'][0]:.3f}"
                f"{'' if matched else ', not matched'})",
                matched and s["valid_ppl"][0] < control[1]["valid_ppl"][0],
            )
        )
    # Divergence: a non-finite perplexity, skipped (non-finite) steps, or a training loss that rose
    # (first ten steps to last ten) by more than dense-adapt's did on the same seed's batches: runs
    # of one seed read the same batches, whose difficulty alone moves the loss (dense-adapt seed 1
    # rose 0.17 nats from a converged start). dense-adapt itself diverged when its validation
    # perplexity ends more than 5% above the pretrained model's.
    runs = [r for r in records if r["variant"] != "dense"]
    rise = lambda r: r.get("train_loss_end", -math.inf) - r.get("train_loss_start", math.inf)  # noqa: E731
    same = lambda r: (r["seed"], r.get("budget", 1))  # noqa: E731  (a 2x run reads batches dense-adapt never saw)
    batches = {same(r): rise(r) for r in runs if r["variant"] == "dense-adapt" and "train_loss_end" in r}
    broken = [
        task_id(r)
        for r in runs
        if not (math.isfinite(r["valid_ppl"]) and math.isfinite(r["ood_ppl"]))
        or r.get("skipped_steps")
        or (
            r["valid_ppl"] > DIVERGED_DENSE * r.get("valid_ppl_before", math.inf)
            if r["variant"] == "dense-adapt"
            else rise(r) - min(DIVERGED_ALLOWANCE, max(0.0, batches.get(same(r), 0.0))) > DIVERGED
        )
    ]
    curves = sum("train_loss_end" in r for r in runs)
    if runs:
        out.append(
            (
                "no NaN or divergence",
                (
                    f"all {len(runs)} runs finite, no skipped steps, training loss of "
                    f"{curves} recorded curves rises less than {DIVERGED} above dense-adapt's on the same batches"
                )
                if not broken
                else f"non-finite, skipped steps or rising loss in {', '.join(broken)}",
                not broken,
            )
        )
    return out


def merged_notes(records: list[dict], notes: list[str]) -> list[str]:
    """The earlier calls' notes (the dense record's) and this call's, each once: a call on some
    variants keeps what the others' calls noted."""
    earlier = next((r.get("notes", []) for r in records if r["variant"] == "dense"), [])
    return list(dict.fromkeys([*earlier, *notes]))


def write(records: list[dict], out: Path) -> None:
    """The records as JSON and, beside them, the Markdown table (its title and notes are the
    dense record's ``description`` and ``notes``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    dense = next(r for r in records if r["variant"] == "dense")
    meta = {"description": dense.get("description", ""), "notes": dense.get("notes", [])}
    table = aggregate(records)
    fmt = lambda s, d=3: f"{s[0]:.{d}f} ± {s[1]:.{d}f}"  # noqa: E731
    lines = [
        f"# LM quality at scale: {meta['description']}",
        "",
        "Produced by (each call adds runs):",
        "",
        *(f"    {c}" for c in dict.fromkeys(r["command"] for r in records if r.get("command"))),
        "",
    ]
    for level in ("1.00", *LEVELS):
        rows = [(k, s) for k, s in table.items() if k[0] == level]
        if not rows:
            continue
        title = "dense and dense-adapt" if level == "1.00" else f"FLOPs level {level}"
        lines += [
            f"## {title}",
            "",
            "| variant | router | placement | seeds | valid ppl | ood ppl | FLOPs / dense | "
            "kept fraction | agreement |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (_, variant), s in rows:
            lines.append(
                f"| {variant} | {s['router']} | {s['placement']} | {s['seeds']} | {fmt(s['valid_ppl'])} | "
                f"{fmt(s['ood_ppl'])} | {fmt(s['flops_ratio'])} | {fmt(s['kept_fraction'])} | "
                f"{fmt(s['agreement'])} |"
            )
        lines.append("")
    if any(row_label(r) != r["variant"] for r in records):
        lines += [
            "Rows marked `~row-mean`, `~pooled` or `~inference` are runs whose calibrated routers (`topk`, "
            "`attention`) set their causal cut-off by an earlier rule: training's running average of each "
            "row's top-k boundary averaged over rows (`row-mean`) or pooled over the batch (`pooled`), both "
            "keeping fewer tokens than the capacity, or set after training layer by layer under the causal "
            "rule on the split's first 32 blocks, from one source package (`inference`), which keeps more "
            f"on the valid split; the other rows of those routers use the `{CUTOFF_RULE}` rule "
            "(`CUTOFF_RULE`: the same on 32 blocks spread evenly over the training split). Rows marked "
            "`~deleted-teacher` distilled a model with deleted layers from that deleted model itself (the "
            "recipe's default teacher, its starting weights); such runs now distill from the dense model "
            "(`DENSE_TEACHER`).",
            "",
        ]
    lines += ["## Goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g} | {m} | {'yes' if ok else '**no**'} |" for g, m, ok in goals(records)]
    rebuilt = [r for r in records if abs(r.get("pretrained_valid_ppl", dense["valid_ppl"]) - dense["valid_ppl"]) > 1e-6]
    if rebuilt:
        lines += [
            "",
            "## Runs from a rebuilt pretrained model",
            "",
            "These runs started from a rebuild whose valid loss matched the record within the tolerance but "
            "whose weights were not identical:",
            "",
            *(
                f"- {task_id(r)}: pretrained valid ppl {r['pretrained_valid_ppl']:.3f} (recorded "
                f"{dense['valid_ppl']:.3f})"
                for r in rebuilt
            ),
        ]
    if meta["notes"]:
        lines += ["", "## Not run", "", *(f"- {n}" for n in meta["notes"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# --- driver and workers -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="directory with train/valid/ood .txt.gz")
    p.add_argument("--work", default="/tmp/modadapt-lm-scale", help="tokenizer, pretrained model, runs, records")
    p.add_argument(
        "--out", help=f"JSON records (default {RESULTS.relative_to(ROOT.parent)}; --tiny: WORK/lm_quality_scale.json)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny model and budget on slices of the text (CPU, the tests)")
    p.add_argument(
        "--variants",
        default="all",
        help=f"comma list (default: all; 'core': {', '.join(CORE)}; names may join 'core'): {', '.join(VARIANTS)}",
    )
    p.add_argument("--seeds", default="0,1,2", help="adaptation seeds (the pretrained model is one)")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--jobs", type=int, default=1, help="adaptations run at once (processes on one device)")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument(
        "--keep-models",
        default="",
        help="comma list of variants whose adapted model stays in WORK/runs/RUN/model (modadapt.save)",
    )
    p.add_argument("--append", action="store_true", help="keep the records already in --out and skip their runs")
    p.add_argument(
        "--new-pretrained",
        action="store_true",
        help="record the pretrained model built now as the reference (else a rebuild must match the recorded one)",
    )
    p.add_argument("--table-only", action="store_true", help="only rewrite the Markdown table from the --out records")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run tasks from this plan file
    args = p.parse_args(argv)
    args.out = str(args.out or (Path(args.work) / "lm_quality_scale.json" if args.tiny else RESULTS))
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.new_pretrained and args.append:  # the appended runs would start from another model
        p.error("--new-pretrained records a new pretrained model: write its runs to a new --out instead of --append")
    if args.variants != "all":  # 'core' expands in place, each variant once
        names = [n for part in args.variants.split(",") for n in (CORE if part == "core" else [part])]
        args.variants = ",".join(dict.fromkeys(names))
    for option, names in (
        ("variants", "" if args.variants == "all" else args.variants),
        ("keep-models", args.keep_models),
    ):
        unknown = sorted({n for n in names.split(",") if n} - set(VARIANTS))
        if unknown:  # checked before the data and the pretrained model are built (minutes on the GPU)
            raise SystemExit(f"--{option}: unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def context(args: argparse.Namespace, command: str) -> dict:
    scale = TINY if args.tiny else Scale()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    data = prepare_data(args, scale, work)
    dense, record = pretrained_model(args, scale, data, work, device)
    dense.to(device).eval().requires_grad_(False)
    scores = layer_scores(dense, data, work, device)
    reference_file = work / "reference.pt"
    if not reference_file.is_file():
        torch.save(reference_continuations(dense, data["prompts"], scale, device), reference_file)
    return {
        "args": args,
        "scale": scale,
        "work": work,
        "device": device,
        "data": data,
        "dense": dense,
        "pretrain": record,
        "scores": scores,
        "reference": torch.load(reference_file),
        "command": command,
    }


def claim(work: Path, task: dict) -> bool:
    """Atomically take `task` for this process (a claim file), so that workers share one queue."""
    (work / "claims").mkdir(exist_ok=True)
    try:
        os.close(os.open(work / "claims" / task_id(task), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work_through(ctx: dict, plan_file: Path) -> None:
    """Run the plan's tasks that no other process has claimed, until none is left or the deadline.
    A run that finds the device's memory full (the other workers' peaks) gives its task back and
    ends this worker: the others, fewer now, take the task up on their next pass."""
    plan_data = json.loads(plan_file.read_text())
    work = ctx["work"]
    (work / "records").mkdir(exist_ok=True)
    took = True
    while took:  # passes over the plan until one claims nothing (a task given back is claimable again)
        took = False
        for task in plan_data["tasks"]:
            if plan_data["deadline"] and time.time() > plan_data["deadline"]:
                return
            if (work / "records" / f"{task_id(task)}.json").is_file() or not claim(work, task):
                continue
            took = True
            try:
                record = run_task(task, ctx)
            except torch.OutOfMemoryError:
                (work / "claims" / task_id(task)).unlink()
                print(f"{task_id(task)}: out of device memory; given back, this worker stops", flush=True)
                return
            (work / "records" / f"{task_id(task)}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"{task_id(task)}: valid ppl {record['valid_ppl']:.3f}, ood {record['ood_ppl']:.3f}, FLOPs "
                f"{record['flops_ratio']:.3f}, kept {record['kept_fraction']:.3f}, agreement "
                f"{record['agreement']:.3f}, {record['wall_s']:.0f}s",
                flush=True,
            )


def unfinished(work: Path, tasks: list[dict]) -> list[str]:
    """The ids of `tasks` with no record in `work`: a call that ends must say what it left undone."""
    return [task_id(t) for t in tasks if not (work / "records" / f"{task_id(t)}.json").is_file()]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.tiny:  # tiny matrices: one thread avoids oversubscription on a busy CPU
        torch.set_num_threads(1)
    command = "python benchmarks/lm_quality_scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.table_only:
        records = json.loads(Path(args.out).read_text())
        write(records, Path(args.out))
        return records
    if args.worker:  # the driver's command is the one that made these runs
        ctx = context(args, json.loads(Path(args.worker).read_text())["command"])
        work_through(ctx, Path(args.worker))
        return []
    start = time.time()
    ctx = context(args, command)
    work, scale, dense = ctx["work"], ctx["scale"], ctx["dense"]
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, notes = plan(dense, scale, ctx["scores"], variants, seeds)
    done = {task_id(r) for r in merge_records(args, work)}
    pending = [t for t in tasks if task_id(t) not in done]
    for path in (work / "claims").glob("*") if (work / "claims").is_dir() else []:
        if path.name not in done:
            path.unlink()  # a claim whose run never finished (an interrupted call) is free again
    plan_file = work / "plan.json"
    plan_file.write_text(
        json.dumps({"tasks": pending, "deadline": start + args.budget_s if args.budget_s else 0, "command": command})
    )
    print(f"{len(pending)} of {len(tasks)} runs to do; levels {levels(dense, scale.seq_len)}", flush=True)
    if args.jobs == 1:
        work_through(ctx, plan_file)
    else:
        worker_argv = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--worker", str(plan_file)]
        procs = []
        for i in range(args.jobs):
            log = open(work / f"worker-{i}.log", "a")
            procs.append(subprocess.Popen(worker_argv, stdout=log, stderr=subprocess.STDOUT))
        codes = [proc.wait() for proc in procs]
        if any(codes):
            print(f"worker exit codes {codes}; see {work}/worker-*.log", flush=True)
    missing = unfinished(work, pending)
    if missing:
        print(
            f"{len(missing)} planned runs not done (the --budget-s deadline passed, or a run that ran out of "
            f"memory was given back after the other workers stopped): {', '.join(missing)}; call again to run them",
            flush=True,
        )
    records = merge_records(args, work)
    dense = next((r for r in records if r["variant"] == "dense"), None) or {  # the recorded one stays
        "variant": "dense",
        "level": "1.00",
        "seed": args.seed,
        "router": "dense",
        "placement": "-",
        "params": ctx["pretrain"]["model"]["params"],
        "layers": scale.layers,
        "flops_ratio": 1.0,
        "kept_fraction": 1.0,
        "valid_ppl": ctx["pretrain"]["valid_ppl"],
        "ood_ppl": ctx["pretrain"]["ood_ppl"],
        "agreement": 1.0,
        "adapt_tokens": 0,
        "pretrained_valid_ppl": ctx["pretrain"]["valid_ppl"],
        "command": command,
    }
    dense["description"] = (
        f"Llama {scale.layers} x {scale.hidden}, {dense['params'] / 1e6:.1f}M parameters, BPE "
        f"{scale.vocab}, {scale.adapt_steps} adaptation steps of {scale.adapt_batch} x "
        f"{scale.seq_len} tokens"
    )
    dense["notes"] = merged_notes(records, notes)
    records = [dense] + [r for r in records if r["variant"] != "dense"]
    write(records, Path(args.out))
    for goal, measured, met in goals(records):
        print(f"goal: {goal}: {measured} -> {'met' if met else 'NOT met'}", flush=True)
    print(f"{time.time() - start:.0f}s; {len(records)} records in {args.out}", flush=True)
    return records


if __name__ == "__main__":
    main()
