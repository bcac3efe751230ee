"""`prune(model, layers)`: delete whole layers of a causal LM, the static baseline routing must beat.

At the quality benchmark's scale (a 12-layer, 97M-parameter Llama: benchmarks/README.md) deleting
evenly spaced layers and distilling from the original for the adaptation budget beats every
learned router at ~0.69 and ~0.53 of dense FLOPs, in and out of domain. So the tool offers it:
`modadapt prune` writes a plain transformers model (it loads without modadapt), which
``modadapt train lm-adapt --router none --train all --teacher ORIGINAL`` then heals.

Layers are named as `ModConfig.layers` names them (``evenly:4``, ``2,5,7,10``, ``from:REPORT``: the
most redundant layers by `modadapt analyze`, ShortGPT's choice with ``--metric cosine``), or by a
FLOPs target (`evenly_for_flops`: the evenly spaced deletion nearest it); layer 0 always stays.
The kept layers are renumbered (their ``layer_idx``, which indexes the KV cache) and the config's
per-layer lists (``layer_types``, ...) shortened to match; a model whose shortened config would
rebuild something else is refused before anything changes, not saved half right.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import EVENLY, evenly_count, evenly_spaced, normalize_layer_spec, resolve_layers
from .errors import ModAdaptError
from .mod_layer import state_of

#: The record `save_pruned` writes beside the model (also the marker `--overwrite` looks for).
PRUNE_FILE = "prune.json"

#: Config fields that hold layer indices (not one entry per layer): renumbered to the kept layers.
INDEX_FIELDS = ("mlp_only_layers",)
#: Config lists with one entry per layer whose names do not say "layer" (those that do count too).
PER_LAYER_FIELDS = ("intermediate_size", "activation_sparsity_pattern")


def prunable_layers(model: nn.Module) -> int:
    """How many layers the causal LM `model` has (refusing a converted model or another kind)."""
    from .metrics.layer_stack import find_layers
    from .sources import is_causal_lm

    if state_of(model) is not None:
        raise ModAdaptError("this model is converted; prune its dense original (modadapt.unload gives it back).")
    if not is_causal_lm(model):
        raise ModAdaptError(f"prune deletes layers of causal language models; {type(model).__name__} is not one.")
    count = len(find_layers(model))
    if count < 2:
        raise ModAdaptError("the model has one layer, which always stays: there is nothing to delete.")
    return count


def evenly_for_flops(model: nn.Module, target: float, tokens: int = 256) -> str:
    """The ``evenly:N`` rule whose deletion brings the FLOPs per token of `model` (at `tokens`
    tokens) nearest `target`, a share of the whole model's: how ``modadapt prune --flops`` and the
    quality benchmark size a deletion."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ModAdaptError(f"the FLOPs target must be a share between 0 and 1 (e.g. 0.7), got {target!r}.")
    count = prunable_layers(model)
    ratios = {n: flops_ratio(model, evenly_spaced(n, list(range(1, count))), tokens) for n in range(1, count)}
    return f"{EVENLY}{min(ratios, key=lambda n: abs(ratios[n] - target))}"


def layers_to_delete(model: nn.Module, layers: Any) -> list[int]:
    """The indices `layers` (a `ModConfig.layers` spec) names in the causal LM `model`, checked."""
    count = prunable_layers(model)
    if not (layers.strip(" ,") if isinstance(layers, str) else layers):
        raise ModAdaptError("no layer named to delete; name at least one, e.g. --layers evenly:4.")
    spec = normalize_layer_spec(layers)
    if isinstance(spec, list) and 0 in spec:
        raise ModAdaptError("layer 0 always stays (every model keeps its first layer); delete layers from 1 on.")
    if isinstance(spec, str) and spec.startswith(EVENLY) and evenly_count(spec) >= count:
        raise ModAdaptError(
            f"{spec} would delete {evenly_count(spec)} of {count} layers; layer 0 stays, so 1 to {count - 1}."
        )
    return resolve_layers(spec, count)


def prune(model: nn.Module, layers: Any) -> list[int]:
    """Delete the layers `layers` names (a `ModConfig.layers` spec) from the causal LM `model`, in
    place; returns the deleted indices (of the original stack)."""
    from .metrics.layer_stack import analysis_adapter

    drop = layers_to_delete(model, layers)
    adapter, stack = analysis_adapter(model)
    count = len(stack)
    owner = adapter.layer_stack(model)[0]
    name = next((n for n, child in owner.named_children() if child is stack), None)
    if name is None:
        raise ModAdaptError(f"could not find where {type(owner).__name__} holds its layers; it cannot be pruned.")
    config = model.config.get_text_config(decoder=True)
    kept = [i for i in range(count) if i not in drop]
    shortened = _shortened_config(config, kept, count)
    _check_rebuilds(model, shortened, stack, kept)
    setattr(owner, name, nn.ModuleList(stack[i] for i in kept))
    for key, value in shortened.items():
        setattr(config, key, value)
    for new, layer in enumerate(getattr(owner, name)):
        for module in layer.modules():  # attention (and some layers) index the KV cache by it
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    return drop


def read_record(directory: str | os.PathLike) -> dict | None:
    """The ``prune.json`` of a directory `modadapt prune` wrote, else None."""
    path = Path(directory) / PRUNE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def prune_with_record(
    model: nn.Module,
    layers: Any = None,
    *,
    source: str,
    flops: float | None = None,
    seq_len: int = 256,
    seed: int | None = None,
) -> dict:
    """`prune` `model` (loaded from `source`; a preset: built with `seed`) of the `layers` named,
    or of the evenly spaced deletion nearest `flops` (`evenly_for_flops`), and return what
    ``prune.json`` records of it: the deleted and kept layers, parameters and FLOPs per token
    relative to the source at `seq_len` tokens. A source that was pruned before (its own record)
    chains: ``original`` names the first model, ``flops_ratio_of_original`` is relative to it."""
    from .metrics.layer_stack import find_layers
    from .version import __version__

    if seq_len < 1:
        raise ModAdaptError(f"seq_len must be at least 1, got {seq_len}.")
    if (layers is None) == (flops is None):
        raise ModAdaptError("name the layers to delete or a FLOPs target, one of them.")
    if flops is not None:
        layers = evenly_for_flops(model, flops, seq_len)
    drop = layers_to_delete(model, layers)
    count, before = len(find_layers(model)), sum(p.numel() for p in model.parameters())
    ratio = flops_ratio(model, drop, seq_len)
    prune(model, drop)
    previous = read_record(source) if Path(source).is_dir() else None
    chain = {}
    if previous is not None:
        chain = {
            "original": previous.get("original", previous["source"]),
            "flops_ratio_of_original": ratio * previous.get("flops_ratio_of_original", previous["flops_ratio"]),
            "previous": previous,
        }
    return {
        "source": source,
        **({"seed": seed} if seed is not None else {}),
        **chain,
        **({"flops_target": flops} if flops is not None else {}),
        "layers": layers if isinstance(layers, str) else list(layers),
        "deleted_layers": drop,
        "kept_layers": [i for i in range(count) if i not in drop],
        "num_layers": {"before": count, "after": count - len(drop)},
        "parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())},
        "flops_ratio": ratio,
        "flops_seq_len": seq_len,
        "modadapt_version": __version__,
    }


def describe(record: dict) -> str:
    """One line on what ``prune.json`` `record` says was deleted, and the FLOPs left."""
    line = (
        f"layers {record['deleted_layers']} of {record['source']} deleted: {record['flops_ratio']:.3f} of its "
        "FLOPs per token"
    )
    if "original" in record:
        line += f", {record['flops_ratio_of_original']:.3f} of the original {record['original']}'s"
    return line


def _shortened_config(config: Any, kept: list[int], count: int) -> dict:
    """The config fields that change when only the layers `kept` of `count` stay."""
    new = {"num_hidden_layers": len(kept)}
    position = {old: i for i, old in enumerate(kept)}
    for key, value in vars(config).items():
        per_layer = key in PER_LAYER_FIELDS or "layer" in key  # not, say, a list of eos ids as long
        if per_layer and key not in INDEX_FIELDS and isinstance(value, (list, tuple)) and len(value) == count:
            new[key] = type(value)(value[i] for i in kept)
    for key in INDEX_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            new[key] = [position[i] for i in value if i in position]
    sparse_step = getattr(config, "decoder_sparse_step", None)
    if isinstance(sparse_step, int) and sparse_step > 1:  # every n-th layer sparse: say which ones stay dense
        dense = [i for i in range(count) if (i + 1) % sparse_step or i in getattr(config, "mlp_only_layers", [])]
        new["decoder_sparse_step"] = 1
        new["mlp_only_layers"] = [position[i] for i in dense if i in position]
    return new


def _check_rebuilds(model: nn.Module, shortened: dict, stack: nn.ModuleList, kept: list[int]) -> None:
    """Refuse a model whose shortened config would build something else than the pruned model (a
    field the shortening misses, a weight sized by the layer count, a layer that fixes a constant
    from its index at init): loading the saved model would then fail, or compute otherwise."""
    import copy

    from .metrics.layer_stack import find_layers

    probe_config = copy.deepcopy(model.config)
    text = probe_config.get_text_config(decoder=True)
    for key, value in shortened.items():
        setattr(text, key, value)
    try:
        with torch.device("meta"):
            rebuilt = type(model)(probe_config)
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild means the family is not supported
        raise ModAdaptError(f"{type(model).__name__} cannot be rebuilt with {len(kept)} layers: {exc}") from None
    refuse = f"{type(model).__name__} cannot be pruned yet: with {len(kept)} layers its config builds"
    prefix = next(name for name, module in model.named_modules() if module is stack) + "."
    outside = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith(prefix)}  # noqa: E731
    want, got = outside(model), outside(rebuilt)
    if want != got:
        key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise ModAdaptError(f"{refuse} {key} as {got.get(key)}, not {want.get(key)}.")
    for new, (old, layer) in enumerate(zip(kept, find_layers(rebuilt))):
        for (name, have), (_, built) in zip(stack[old].named_modules(), layer.named_modules()):
            mismatch = _differs(have, built)
            if mismatch:
                raise ModAdaptError(
                    f"{refuse} layer {new} unlike the kept layer {old} ({name or 'the layer'}: {mismatch})."
                )


def _differs(have: nn.Module, built: nn.Module) -> str | None:
    """How the rebuilt module `built` differs from the kept `have`: class, weight shapes, or a
    setting fixed at init (``layer_idx`` aside, which prune renumbers); None if it does not."""
    if type(have) is not type(built):
        return f"{type(built).__name__} for {type(have).__name__}"
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.named_parameters(recurse=False)}  # noqa: E731
    if shapes(have) != shapes(built):
        return f"weights {shapes(built)} for {shapes(have)}"
    for key, value in vars(have).items():
        if key in ("layer_idx", "training") or not isinstance(value, (bool, int, float, str, type(None))):
            continue
        if vars(built).get(key, value) != value:
            return f"{key} {vars(built)[key]!r} for {value!r}"
    return None


def flops_ratio(original: nn.Module, drop: list[int], tokens: int) -> float:
    """FLOPs per token of `original` without the layers `drop`, relative to all of it, at `tokens` tokens."""
    from .metrics.flops import flops_table, sequence_flops

    table = flops_table(original)
    kept = {"layers": [row for i, row in enumerate(table["layers"]) if i not in drop], "head": table["head"]}
    return sequence_flops(kept, tokens) / sequence_flops(table, tokens)


def save_pruned(
    model: nn.Module,
    directory: str | os.PathLike,
    record: dict,
    *,
    overwrite: bool = False,
    extra_files=(),
    tokenizer: Any = None,
) -> Path:
    """Save the pruned `model` as a plain transformers directory with its tokenizer
    (`persistence.save_unconverted`) and `record` as ``prune.json``, all at once."""
    from .persistence import save_unconverted

    return save_unconverted(
        model,
        directory,
        marker=PRUNE_FILE,
        overwrite=overwrite,
        extra_files=extra_files,
        tokenizer=tokenizer,
        texts={PRUNE_FILE: json.dumps(record, indent=2) + "\n"},
    )
