"""The byte-level presets' tokenizer: a real `transformers` tokenizer whose ids are UTF-8 bytes.

The text presets (`tiny-llama`, `tiny-gpt2`, ...) have a 256-token vocabulary and read text as
UTF-8 bytes; their config says so (``config.modadapt_tokenizer == "bytes"``). `byte_tokenizer`
builds the matching `transformers.PreTrainedTokenizerFast` (a `tokenizers` byte-level BPE without
merges: token id = byte value) with the special tokens the config declares, named
``<pad>`` / ``<s>`` / ``</s>`` (``<|endoftext|>`` when BOS and EOS are one id, as in GPT-2). A
special token shares its id with a control byte (0, 1, 2), which real text does not contain;
decoding prints the token's name for it. The tokenizer adds no BOS/EOS by itself: ``tok(text)``
gives exactly the bytes, as the tokenizer-free path (`calibration.text_batches`,
`lm_adapt.tokenize`) does.

`modadapt.save`, `modadapt convert`, `modadapt demo -o` and the recipes save it next to the
weights (``tokenizer.json``, ``tokenizer_config.json``), so a saved directory works with
`AutoTokenizer`, lm-eval and `modadapt eval` like any other model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModAdaptError

#: The config attribute that marks a byte-level model, and its value.
BYTE_LEVEL_KEY, BYTE_LEVEL = "modadapt_tokenizer", "bytes"
BYTE_VOCAB = 256
#: The files whose presence means a directory has a tokenizer of its own.
OWN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def mark_byte_level(model: Any) -> Any:
    """Record in `model.config` that the model reads UTF-8 bytes (a preset builder calls it)."""
    setattr(model.config, BYTE_LEVEL_KEY, BYTE_LEVEL)
    return model


def is_byte_level(model_or_config: Any) -> bool:
    """Whether the model (or config) is marked byte-level and has the 256-token vocabulary."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, BYTE_LEVEL_KEY, None) != BYTE_LEVEL:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None) == BYTE_VOCAB


def has_tokenizer_files(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any((path / name).is_file() for name in OWN_TOKENIZER_FILES)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for every byte (`tokenizers`' ByteLevel alphabet), by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def special_tokens(config: Any) -> dict[str, int]:
    """`{role: id}` of the special tokens `config` declares (pad, bos, eos), ids inside the vocabulary."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    out = {}
    for role in ("pad", "bos", "eos"):
        value = getattr(text, f"{role}_token_id", None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < BYTE_VOCAB:
            out[role] = value
    return out


def byte_tokenizer(model_or_config: Any) -> Any:
    """The byte-level tokenizer of a byte-level model: ids = UTF-8 bytes, plus the config's
    special tokens (see the module docstring). A model not marked byte-level is refused."""
    config = getattr(model_or_config, "config", model_or_config)
    if not is_byte_level(config):
        raise ModAdaptError(
            "byte_tokenizer is for the byte-level presets (256-token vocabulary, "
            f"config.{BYTE_LEVEL_KEY} = {BYTE_LEVEL!r}); give this model its own tokenizer."
        )
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    backend = Tokenizer(models.BPE(vocab={symbol: byte for byte, symbol in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    ids = special_tokens(config)
    backend.add_special_tokens(
        [AddedToken(symbols[i], special=True, normalized=False) for i in sorted(set(ids.values()))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, split_special_tokens=True, **{f"{role}_token": symbols[i] for role, i in ids.items()}
    )


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in `directory` (`AutoTokenizer`, offline), or None when it has none."""
    if not has_tokenizer_files(directory):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModAdaptError(f"could not load the tokenizer in {directory}: {exc}") from None


def tokenizer_for(model: Any, source: str | Path | None = None) -> Any:
    """The tokenizer of `model`: the one saved in `source` (or in the directory the model was
    loaded from), else the byte tokenizer of a byte-level model, else None."""
    for directory in (source, getattr(model, "name_or_path", None)):
        if directory and has_tokenizer_files(directory):
            return load_tokenizer(directory)
    return byte_tokenizer(model) if is_byte_level(model) else None
