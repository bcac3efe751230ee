"""Calibration data for layer analysis, and running a model over it.

Text comes from local `.txt` / `.jsonl` files (optionally gzipped) or a directory of them; it is
tokenised with the model's tokenizer when the model directory has one, else as UTF-8 bytes modulo
the vocabulary size (the presets' tokenizer-free convention). Samples are fixed-length windows.
Images (for vision models) come from a local folder, read with PIL and prepared with timm's eval
transform for the model's data config.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModAdaptError

Batch = dict | torch.Tensor
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_DATA = "builtin:default"
BUILTIN_IMAGES = "builtin:noise"


# --- running a model over batches ---------------------------------------------------------------
@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the model's training flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def device_batches(model: nn.Module, batches: Iterable[Batch], *, progress: bool, desc: str) -> Iterator[Batch]:
    """`batches` moved to the model's device, with an optional tqdm progress bar."""
    device = next(model.parameters()).device
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", total=len(batches) if hasattr(batches, "__len__") else None)
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            yield batch.to(device)
        else:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_model(model: nn.Module, batch: Batch) -> Any:
    return model(batch) if isinstance(batch, torch.Tensor) else model(**batch)


def padding_mask_of(batch: Batch) -> torch.Tensor | None:
    """`[B, T]` bool, True for real tokens; None when the batch carries no attention mask."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def summarize(layer: int, values: torch.Tensor, normalized: torch.Tensor | None) -> dict:
    """Mean and spread (population std) over samples of one layer's per-sample metric."""
    row = {"layer": layer, "mean": values.mean().item(), "std": values.std(correction=0).item()}
    row["normalized_mean"] = normalized.mean().item() if normalized is not None else None
    row["normalized_std"] = normalized.std(correction=0).item() if normalized is not None else None
    row["samples"] = values.numel()
    return row


# --- reading text --------------------------------------------------------------------------------
def calibration_kind(model: nn.Module) -> str | None:
    """What calibration data `model` reads (``"text"``, ``"images"``, ``"llava"``; None: none):
    its adapter's `calibration_kind`. A model no adapter converts is still analysed: text when it
    has a vocabulary, images when it has a patch embedding."""
    from ..plugins import find_adapter

    try:
        return find_adapter(model).calibration_kind(model)
    except ModAdaptError:
        pass
    if getattr(getattr(model, "config", None), "vocab_size", None) is not None:
        return "text"
    return "images" if hasattr(model, "patch_embed") else None


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if files:
            return files
        raise ModAdaptError(f"--data {path} holds no {'/'.join(TEXT_SUFFIXES)} files.")
    raise ModAdaptError(f"--data {path} does not exist; give a local text file or directory.")


def _file_text(file: Path) -> str:
    raw = file.read_bytes()
    if file.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except OSError as exc:
            raise ModAdaptError(f"{file} is not valid gzip: {exc}") from None
    text = raw.decode("utf-8", errors="replace")
    if not file.name.removesuffix(".gz").endswith(".jsonl"):
        return text
    parts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ModAdaptError(f"{file}:{number} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ModAdaptError(f"{file}:{number} has no string field 'text'.")
        parts.append(record["text"])
    return "\n\n".join(parts)


def read_text(data: str | None) -> tuple[str, str, str]:
    """`(text, path as recorded, sha256 of the raw bytes)`; None gives the built-in text."""
    if data is None:
        from .calibration_text import DEFAULT_TEXT

        return DEFAULT_TEXT, BUILTIN_DATA, hashlib.sha256(DEFAULT_TEXT.encode()).hexdigest()
    files = _text_files(Path(data))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    text = "\n\n".join(_file_text(f) for f in files)
    if not text.strip():
        raise ModAdaptError(f"--data {data} holds no text.")
    return text, str(data), digest.hexdigest()


def token_windows(ids: list[int], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[samples, seq_len]` windows of `ids`: distinct non-overlapping windows drawn with `seed`
    when there are enough, else evenly spaced overlapping ones."""
    if len(ids) < seq_len:
        raise ModAdaptError(
            f"the calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}; "
            "give more text or a shorter --seq-len."
        )
    available = len(ids) // seq_len
    if available >= samples:
        starts = sorted(i * seq_len for i in random.Random(seed).sample(range(available), samples))
    else:
        span = len(ids) - seq_len
        starts = [round(i * span / max(samples - 1, 1)) for i in range(samples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def text_batches(
    text: str, *, tokenizer: Any, vocab_size: int, samples: int, seq_len: int, batch_size: int, seed: int
) -> tuple[list[dict], int]:
    """`(batches, tokens in the text)`: model inputs (`input_ids`, `attention_mask`) of `samples`
    windows, `batch_size` per batch; the count tells whether the windows had to overlap."""
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = [b % vocab_size for b in text.encode("utf-8")]
    windows = token_windows(ids, samples, seq_len, seed)
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]
    return batches, len(ids)


def model_tokenizer(source: str) -> Any:
    """The tokenizer saved in model directory `source`, or None (presets, directories without one:
    their text is read as bytes, which is what a byte-level preset's tokenizer gives too)."""
    from ..tokenizer import load_tokenizer

    return load_tokenizer(source) if Path(source).is_dir() else None


# --- reading images ------------------------------------------------------------------------------
def image_batches(
    data: str | None, model: nn.Module, *, samples: int, batch_size: int, seed: int
) -> tuple[list[torch.Tensor], str, str]:
    """`(pixel batches, path as recorded, sha256)` for a timm vision model.

    `data` is a folder of images (searched recursively; `samples` of them drawn with `seed`);
    None gives seeded noise images, only meaningful for the randomly initialised presets.
    """
    from timm.data import create_transform, resolve_data_config

    from ..adapters.timm import input_size

    size = input_size(model)
    config = resolve_data_config({"input_size": size}, model=model)
    config["input_size"] = size
    if data is None:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(samples, *config["input_size"], generator=generator)
        return list(pixels.split(batch_size)), BUILTIN_IMAGES, hashlib.sha256(f"noise:{seed}".encode()).hexdigest()
    root = Path(data)
    if not root.exists():
        raise ModAdaptError(f"--data {root} does not exist; give a local folder of images.")
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ModAdaptError(f"--data {root} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    if len(files) > samples:
        files = sorted(random.Random(seed).sample(files, samples))
    from PIL import Image, UnidentifiedImageError

    transform = create_transform(**config)
    digest = hashlib.sha256()
    images = []
    for file in files:
        digest.update(file.read_bytes())
        try:
            with Image.open(file) as image:
                images.append(transform(image.convert("RGB" if size[0] == 3 else "L")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ModAdaptError(f"{file} is not a readable image: {exc}") from None
    return list(torch.stack(images).split(batch_size)), str(data), digest.hexdigest()


def image_tokens(model: nn.Module) -> int:
    """Tokens a timm ViT processes per image: patches plus prefix (class/register) tokens."""
    return int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 0))
