"""A MoD directory as transformers sees it: `save_pretrained`, ``config.json`` and the Auto classes.

- **save_pretrained.** Converting a transformers model gives it an instance `save_pretrained`
  (`attach_save_pretrained`) that runs transformers' own and then makes the directory a modadapt
  one: ``modadapt.json``, the wrapped ``config.json`` below and, for a byte-level preset, its
  tokenizer. `Trainer.save_model` and the Trainer's checkpoints call it, so `modadapt.load` reads
  what they write; the weights keep the model's own key names (``save_original_format=False``).
- **config.json.** A MoD directory's ``config.json`` has ``"model_type": "modadapt"`` and the
  model's own config under ``"base_config"``, so no dense class loads it by accident (a dense
  model with the router weights "unexpected" computes different logits). modadapt registers the
  type with `AutoConfig`, `AutoModelForCausalLM` and `AutoModelForImageTextToText` when it is
  imported: ``AutoModelForCausalLM.from_pretrained(dir)`` then returns ``modadapt.load(dir)``.
  Without modadapt, transformers refuses the unknown model type ``modadapt``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from ...errors import ModAdaptError

MODEL_TYPE = "modadapt"
CONFIG_FILE = "config.json"


class ModadaptConfig(PretrainedConfig):
    """The ``config.json`` of a MoD directory: the converted model's own config, wrapped."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, **kwargs: Any):
        self.base_config = base_config
        super().__init__(**kwargs)


# --- config.json -------------------------------------------------------------------------------------
def wrap_config(directory: str | Path) -> None:
    """Rewrite the transformers ``config.json`` in `directory` as a MoD directory's (idempotent)."""
    path = Path(directory) / CONFIG_FILE
    base = json.loads(path.read_text())
    if base.get("model_type") == MODEL_TYPE:
        return
    wrapped = {"model_type": MODEL_TYPE, "base_config": base, "transformers_version": base.get("transformers_version")}
    path.write_text(json.dumps(wrapped, indent=2, sort_keys=True) + "\n")


def base_config(directory: str | Path) -> PretrainedConfig:
    """The converted model's own config saved in `directory` (wrapped or, as modadapt format 1
    wrote it, plain)."""
    import transformers

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModAdaptError(f"{directory} has no {CONFIG_FILE}; could not rebuild the architecture.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModAdaptError(f"{path} is corrupt: {exc}; could not rebuild the architecture.") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        return transformers.AutoConfig.from_pretrained(str(directory))
    base = data.get("base_config")
    kind = base.get("model_type") if isinstance(base, dict) else None
    if kind not in transformers.CONFIG_MAPPING:
        raise ModAdaptError(
            f"{path}: base_config has no model type transformers knows ({kind!r}); could not rebuild the architecture."
        )
    config = transformers.CONFIG_MAPPING[kind].from_dict(base)
    config._name_or_path = str(directory)
    return config


# --- save_pretrained ---------------------------------------------------------------------------------
class SavePretrained:
    """A converted model's `save_pretrained` (an instance attribute; `unload` removes it). An
    object, not a closure, so that `copy.deepcopy(model)` gives the copy one bound to the copy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(
        self,
        save_directory: str,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        from ...persistence import metadata, save_byte_tokenizer, write_meta

        if push_to_hub:
            raise ModAdaptError(
                "save_pretrained(push_to_hub=True) of a MoD model: save it locally, then upload "
                "the directory (huggingface_hub.upload_folder); modadapt.load reads it back."
            )
        if kwargs.get("variant"):
            raise ModAdaptError(
                "save_pretrained(variant=...) of a MoD model: modadapt.load reads model.safetensors; leave variant out."
            )
        model = self.model
        original = type(model).save_pretrained
        if "save_original_format" in inspect.signature(original).parameters:
            kwargs.setdefault("save_original_format", False)  # the model's own key names, as modadapt.load reads
        meta = metadata(model)
        state_dict = _without_shared_router_copies(model.state_dict() if state_dict is None else state_dict)
        original(model, save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if not is_main_process or not (Path(save_directory) / CONFIG_FILE).is_file():
            return
        wrap_config(save_directory)
        save_byte_tokenizer(model, save_directory)
        write_meta(meta, save_directory)


def _without_shared_router_copies(state_dict: dict) -> dict:
    """`state_dict` with a router shared by several layers (`shared-vl`) held once, under its
    first layer's names: transformers refuses shared tensors it does not know as tied, and
    `modadapt.load` restores the sharing (`convert`) and counts the other names as present."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        if ".router." in f".{name}" and isinstance(tensor, torch.Tensor) and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor
    return out


class _Detach:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def remove(self) -> None:
        if isinstance(self.model.__dict__.get("save_pretrained"), SavePretrained):
            del self.model.__dict__["save_pretrained"]


def attach_save_pretrained(model: torch.nn.Module) -> list:
    """Give a converted transformers model the `save_pretrained` above; returns its remover."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return []
    model.__dict__["save_pretrained"] = SavePretrained(model)
    return [_Detach(model)]


# --- AutoModel*.from_pretrained -------------------------------------------------------------------------
#: Arguments transformers' Auto classes pass along that mean nothing for a local MoD directory.
_PASSED_ALONG = {
    "config",
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "token",
    "_from_auto",
    "_from_pipeline",
    "trust_remote_code",
    "adapter_kwargs",
    "code_revision",
    "use_safetensors",
    "low_cpu_mem_usage",
    "subfolder",
}


def restore(name_or_path: str, model_args: tuple, kwargs: dict) -> torch.nn.Module:
    """``AutoModel*.from_pretrained`` of a MoD directory: `modadapt.load`, honouring ``dtype`` /
    ``torch_dtype``, a single-device ``device_map`` and ``attn_implementation``."""
    from ...persistence import load

    path = Path(name_or_path)
    if kwargs.get("subfolder"):
        path = path / kwargs["subfolder"]
    if not path.is_dir():
        raise ModAdaptError(
            f"{name_or_path} is a modadapt model; modadapt loads local directories (download it "
            "first, e.g. huggingface_hub.snapshot_download)."
        )
    if model_args:
        raise ModAdaptError(f"from_pretrained of the modadapt directory {path} takes no positional model arguments.")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    device = kwargs.get("device_map")
    attn = kwargs.get("attn_implementation")
    unsupported = sorted(
        k
        for k, v in kwargs.items()
        if k not in _PASSED_ALONG | {"dtype", "torch_dtype", "device_map", "attn_implementation"}
        and v not in (None, False, {}, ())
    )
    if unsupported:
        raise ModAdaptError(
            f"from_pretrained of the modadapt directory {path}: {', '.join(unsupported)} "
            "is not supported; load it with modadapt.load and adjust the model afterwards."
        )
    if isinstance(device, dict) or device == "auto":
        if isinstance(device, dict) and len(set(device.values())) > 1:
            raise ModAdaptError("a modadapt model loads onto one device; give device_map a single device.")
        device = (
            next(iter(device.values()))
            if isinstance(device, dict)
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
    if isinstance(device, int):
        device = torch.device("cuda", device)
    model = load(path, device=device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ModAdaptError(f"dtype {kwargs.get('dtype', kwargs.get('torch_dtype'))!r} is not a torch dtype.")
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


class _Restorer:
    config_class = ModadaptConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any) -> torch.nn.Module:
        return restore(str(pretrained_model_name_or_path), model_args, kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> None:
        raise ModAdaptError(
            "a modadapt config describes a saved MoD directory; build the dense model from its "
            "base_config and convert it, or load the directory with modadapt.load."
        )

    _from_config = from_config


class ModadaptForCausalLM(_Restorer):
    """What `AutoModelForCausalLM` resolves a MoD directory to: its `from_pretrained` is `modadapt.load`."""


class ModadaptForImageTextToText(_Restorer):
    """`AutoModelForImageTextToText`'s counterpart (LLaVA)."""


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    AutoConfig.register(MODEL_TYPE, ModadaptConfig, exist_ok=True)
    AutoModelForCausalLM.register(ModadaptConfig, ModadaptForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(ModadaptConfig, ModadaptForImageTextToText, exist_ok=True)


register_auto_classes()
