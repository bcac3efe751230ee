"""`save` and `load`: a self-contained directory that loads offline.

Layout: ``modadapt.json`` (format, modadapt version, adapter, architecture description, the
ModConfig and resolved layers), ``model.safetensors`` (every weight, routers included),
whatever the adapter needs to rebuild the architecture (for transformers: ``config.json``) and
the tokenizer: the source model's files, a given tokenizer, or a byte-level preset's own.
Saving goes through `output_dir.atomic_directory`, so a failure never leaves a half-written
directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModConfig
from .convert import convert
from .errors import ModAdaptError
from .mod_layer import state_of
from .output_dir import atomic_directory
from .plugins import get_adapter
from .version import __version__

FORMAT_VERSION = 1
META_FILE = "modadapt.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def save(
    model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False, extra_files=(), tokenizer: Any = None
) -> Path:
    """Save a converted model to `directory` (created; must be new or empty, or with `overwrite`
    an earlier save: a directory without ``modadapt.json`` is never replaced).

    `extra_files` are copied in as they are (e.g. tokenizer files next to the source model);
    `tokenizer` (a transformers tokenizer) is saved with its ``save_pretrained``. With neither, a
    byte-level model (the text presets) gets its byte tokenizer (`modadapt.tokenizer`).
    """
    from safetensors.torch import save_model

    meta = metadata(model)
    with atomic_directory(directory, META_FILE, overwrite) as tmp:
        state_of(model).adapter.save_base(model, str(tmp))
        save_model(model, str(tmp / WEIGHTS_FILE))
        save_companions(model, tmp, extra_files, tokenizer)
        write_meta(meta, tmp)
    return Path(directory)


def save_unconverted(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    marker: str,
    overwrite: bool = False,
    extra_files=(),
    tokenizer: Any = None,
    texts: dict[str, str] | None = None,
) -> Path:
    """Save a model that is not converted (pruned, or trained with lm-adapt's ``router: none``) as
    a plain transformers directory (``save_pretrained``: it loads without modadapt), with its
    tokenizer as `save` does and `texts` (file name -> text), all at once. `marker`: the file
    that marks `directory` as modadapt's, for `overwrite`."""
    if state_of(model) is not None:
        raise ModAdaptError("this model is converted; save it with modadapt.save.")
    with atomic_directory(directory, marker, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        save_companions(model, tmp, extra_files, tokenizer)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return Path(directory)


def save_companions(model: nn.Module, directory: Path, extra_files=(), tokenizer: Any = None) -> None:
    """The files beside the weights: `extra_files` copied, `tokenizer` saved, else a byte-level
    model's byte tokenizer."""
    for extra in extra_files:
        shutil.copy2(extra, directory / Path(extra).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    save_byte_tokenizer(model, directory)


def metadata(model: nn.Module) -> dict:
    """What ``modadapt.json`` records of a converted model (refused for a model not converted)."""
    state = state_of(model)
    if state is None:
        raise ModAdaptError("only converted models can be saved with modadapt.save; call convert first.")
    dtype = next(model.parameters()).dtype
    return {
        "format": FORMAT_VERSION,
        "modadapt_version": __version__,
        "adapter": state.adapter.name,
        "architecture": state.adapter.describe(model),
        "dtype": str(dtype).removeprefix("torch."),
        "mod_config": state.config_dict(),
    }


def write_meta(meta: dict, directory: str | os.PathLike) -> None:
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_byte_tokenizer(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save a byte-level model's tokenizer into `directory` unless it holds a tokenizer already."""
    from .tokenizer import byte_tokenizer, has_tokenizer_files, is_byte_level

    if is_byte_level(model) and not has_tokenizer_files(directory):
        byte_tokenizer(model).save_pretrained(str(directory))


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory)
    if not path.is_dir():
        raise ModAdaptError(f"{path} is not a directory saved by modadapt.save.")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ModAdaptError(f"{path} has no {META_FILE}: it was not saved by modadapt.save.")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModAdaptError(f"{meta_path} is corrupt: {exc}.") from None
    expected = {"format": int, "adapter": str, "architecture": dict, "mod_config": dict}
    if not isinstance(meta, dict):
        raise ModAdaptError(f"{meta_path} is corrupt: it does not hold a JSON object.")
    missing = [k for k in expected if k not in meta]
    if missing:
        raise ModAdaptError(f"{meta_path} lacks {', '.join(missing)}; the directory is corrupt.")
    wrong = [k for k, kind in expected.items() if not isinstance(meta[k], kind) or isinstance(meta[k], bool)]
    if wrong:
        raise ModAdaptError(f"{meta_path} is corrupt: {', '.join(wrong)} has the wrong type.")
    if meta["format"] > FORMAT_VERSION:
        raise ModAdaptError(
            f"{path} was saved in format {meta['format']} by modadapt {meta.get('modadapt_version')}; "
            f"this modadapt ({__version__}) reads format {FORMAT_VERSION}. Upgrade modadapt."
        )
    return meta


def load(directory: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model saved by `save`: the same architecture, routers and weights, offline."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    meta = read_meta(path)
    files = weight_files(path)
    adapter = get_adapter(meta["adapter"]).obj()
    try:
        model = adapter.build(str(path), meta["architecture"])
    except ModAdaptError:
        raise
    except Exception as exc:
        raise ModAdaptError(f"{path}: could not rebuild the architecture: {exc}") from exc
    dtype = getattr(torch, meta.get("dtype", "float32"), None)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if not adapter.matches(model):
        raise ModAdaptError(f"{path}: the rebuilt model is not handled by adapter {meta['adapter']!r}.")
    convert(model, ModConfig.from_dict(meta["mod_config"]), adapter=meta["adapter"])
    expected, loaded = set(model.state_dict()), set()
    for file in files:
        try:
            state = load_file(str(file), device=str(device or "cpu"))
            model.load_state_dict(state, strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModAdaptError(f"{file} is corrupt or does not match the saved architecture: {exc}") from None
        loaded |= set(state)
    unexpected = loaded - expected
    missing = expected - loaded - shared_names(model, loaded)
    if missing or unexpected:
        raise ModAdaptError(
            f"{files[0] if len(files) == 1 else path} does not match the saved architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    model.eval()
    return model


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a saved directory: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names (a sharded `save_pretrained`)."""
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise ModAdaptError(f"{path} has no {WEIGHTS_FILE}; the directory is incomplete.")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModAdaptError(f"{index} is corrupt: {exc}.") from None
    files = [path / name for name in shards]
    absent = [f.name for f in files if not f.is_file()]
    if absent or not files:
        raise ModAdaptError(
            f"{path} lacks the weight shards {absent or 'its index names'}; the directory is incomplete."
        )
    return files


def shared_names(model: nn.Module, present: set[str]) -> set[str]:
    """Names of `model`'s state dict whose tensor shares its storage with one in `present` (tied
    embeddings, a router shared by several layers): files hold such a tensor once."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            by_storage.setdefault(key, []).append(name)
    out = set()
    for names in by_storage.values():
        if len(names) > 1 and present & set(names):
            out |= set(names) - present
    return out
