"""A MODEL argument (a local directory or a preset name) as a model and its tokenizer.

The CLI and every recipe resolve MODEL here, so that a directory, a `modadapt.save` directory and
a preset mean the same thing to ``convert``, ``analyze`` and ``train``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModAdaptError

#: Files beside a model's weights that belong to its tokenizer or generation settings: copied next
#: to a converted / adapted model so that it loads with them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass
class ModelSource:
    """What `load_model` found: the model, whether it is already converted, the tokenizer files
    beside it (`files`), and its tokenizer (`tokenizer`, read on first use: image models need none)."""

    model: nn.Module
    converted: bool = False
    files: list[str] = field(default_factory=list)
    path: Path | None = None  # the directory, None for a preset

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The directory's transformers tokenizer, or None (presets, directories without one)."""
        from .metrics.calibration import model_tokenizer

        return model_tokenizer(str(self.path)) if self.path is not None else None


def load_model(source: str, *, seed: int = 0, converted: bool = True) -> ModelSource:
    """The model named by `source`: a `modadapt.save` directory (loaded with its routing; refused
    when `converted` is False), a local transformers directory (LLaVA or a causal LM), or a preset
    built with weights from `seed`."""
    from .persistence import META_FILE
    from .presets import build_preset, preset_names

    path = Path(source)
    if not path.is_dir():
        presets = preset_names()
        if source not in presets:
            raise ModAdaptError(f"MODEL {source!r} is neither a local directory nor a preset ({', '.join(presets)}).")
        return ModelSource(build_preset(source, seed=seed))
    files = [str(path / name) for name in TOKENIZER_FILES if (path / name).is_file()]
    if (path / META_FILE).is_file():
        if not converted:
            raise ModAdaptError(f"{source} is already a converted model; convert its original instead.")
        from .persistence import load

        return ModelSource(load(path), converted=True, files=files, path=path)
    if not (path / "config.json").is_file():
        raise ModAdaptError(f"{source} has no config.json: it is not a transformers model directory.")
    import transformers

    try:
        model_type = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
        auto = (
            transformers.LlavaForConditionalGeneration if model_type == "llava" else transformers.AutoModelForCausalLM
        )
        model = auto.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModAdaptError(f"could not load {source}: {exc}") from None
    return ModelSource(model.eval(), files=files, path=path)


def load_source_model(source: str) -> tuple[nn.Module, list[str]]:
    """`(model, tokenizer files)` of a dense MODEL: the signature `modadapt.cli.load_source_model`
    had (new code calls `load_model`)."""
    found = load_model(source, converted=False)
    return found.model, found.files


def is_causal_lm(model: Any) -> bool:
    """A text-only `transformers` model with an LM head (not a ViT, not LLaVA, which needs images)."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "vocab_size", None) is not None
        and hasattr(model, "get_output_embeddings")
        and getattr(config, "model_type", None) != "llava"
    )
