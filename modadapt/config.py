"""`ModConfig`: what to convert and how. Every field's help text is reused by the CLI and docs."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ModAdaptError

LAYER_RULES = ("every-other", "all-but-first")
EVENLY = "evenly:"  # `evenly:N`: N layers spread evenly over the convertible ones
FROM_REPORT = "from:"
INFERENCE_ROUTING = ("causal", "topk")
PACKING = ("auto", "packed", "padded")
SCOPES = ("block", "attention", "mlp")


def pack_reserve_value(text: str) -> float | str:
    """A command line's `pack_reserve`: ``auto`` or a share in (0, 1] (argparse's `type`)."""
    if text == "auto":
        return text
    try:
        share = float(text)
    except ValueError:
        share = math.nan
    if not 0.0 < share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a share in (0, 1], got {text!r}")
    return share


@dataclass
class ModConfig:
    """Configuration of a Mixture-of-Depths conversion."""

    router: str = field(
        default="topk",
        metadata={"help": "Registered router name (see `modadapt list routers`)."},
    )
    layers: Any = field(
        default="every-other",
        metadata={
            "help": "Layers to convert: a list of indices, a comma list such as '1,3,5', "
            "'every-other' (1, 3, 5, ...), 'all-but-first', 'evenly:N' (N layers spread evenly, one "
            "in the middle of each of N equal stretches: evenly:4 of 12 layers is 2, 5, 7, 10), or "
            "'from:REPORT_DIR' (the layers a `modadapt analyze` report selected). Layer 0 is never "
            "converted; the rules pass over the layers a family keeps dense (Gemma 2/3: the first "
            "layer of each attention type)."
        },
    )
    capacity: float = field(
        default=0.125,
        metadata={
            "help": "Fraction of tokens a capacity router keeps per sequence, in (0, 1] (noop-expert: of "
            "the real tokens' expert slots that run)."
        },
    )
    router_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Router-specific arguments (CLI: --router-arg KEY=VALUE)."},
    )
    adapter_kwargs: dict = field(
        default_factory=dict,
        metadata={
            "help": "Adapter-specific options, e.g. for LLaVA {'protect': 'question', 'route': 'image'} "
            "(see `modadapt list adapters`); unknown options are an error."
        },
    )
    inference_routing: str = field(
        default="causal",
        metadata={
            "help": "How a model in eval mode routes: 'causal' uses each router's causal rule, so "
            "prefill + decode equal one full forward; 'topk' keeps the training-time selection "
            "for prompts without a cache (decode steps always use the causal rule)."
        },
    )

    packing: str = field(
        default="auto",
        metadata={
            "help": "How a batch whose rows keep different numbers of tokens runs a MoD layer "
            "(threshold routers, causal rules): 'packed' concatenates the rows' kept tokens into "
            "one sequence with variable-length attention (no padding); 'padded' pads every row "
            "to the widest with filler slots; 'auto' packs where a fused variable-length kernel "
            "exists (CUDA, fp16/bf16), else pads. Packed calls keep the KV cache packed too (a "
            "row that skips a layer stores nothing there); multi-token chunks on a filled cache "
            "and sliding windows in reach pad."
        },
    )

    scope: str = field(
        default="block",
        metadata={
            "help": "What a MoD layer routes: 'block' (attention and MLP: a skipped token passes the "
            "layer unchanged and writes no K/V), 'attention' (a skipped token writes no K/V and skips "
            "attention, but goes through the MLP) or 'mlp' (every token goes through attention and "
            "writes K/V; a skipped token skips the MLP). Sublayers need a family whose layers the "
            "adapter can split (every transformers decoder family built in; not timm's ViT). A router "
            "that routes one sublayer only takes it when this is left at 'block' (noop-expert: 'mlp')."
        },
    )

    pack_bucket: int | None = field(
        default=None,
        metadata={
            "help": "Round a packed call's token count without a KV cache (training, prefill with "
            "use_cache=False) up to a multiple of this, with filler tokens in a segment of their "
            "own, so that torch.compile(dynamic=False) compiles once per bucket instead of once "
            "per kept count. None: exact counts (eager needs no buckets)."
        },
    )

    pack_reserve: float | str | None = field(
        default=None,
        metadata={
            "help": "In eval mode without a KV cache (prefill with use_cache=False, scoring), pack "
            "each MoD layer's kept tokens into this share of the call's tokens (rounded up to "
            "pack_bucket) instead of counting them on the host first: no host sync per MoD layer, "
            "which is what bounds batch-1 prefill. 'auto': each layer's own share, the most it has "
            "kept so far times 1.1 in calls of 128 tokens or more (its first such call reserves "
            "every token; under torch.compile(dynamic=False) set pack_bucket too, or each new "
            "share compiles anew). A forward in which some layer keeps more runs again with exact "
            "counts (one read per forward, at its end). None: exact counts."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.router, str) or not self.router:
            raise ModAdaptError("ModConfig.router must be a router name, e.g. 'topk'.")
        try:
            if isinstance(self.capacity, bool):
                raise TypeError
            self.capacity = float(self.capacity)
        except (TypeError, ValueError):
            raise ModAdaptError(f"capacity must be a number in (0, 1], got {self.capacity!r}.") from None
        if not 0.0 < self.capacity <= 1.0:
            raise ModAdaptError(f"capacity must be in (0, 1], got {self.capacity}.")
        if self.inference_routing not in INFERENCE_ROUTING:
            raise ModAdaptError(
                f"inference_routing must be one of {INFERENCE_ROUTING}, got {self.inference_routing!r}."
            )
        if self.packing not in PACKING:
            raise ModAdaptError(f"packing must be one of {PACKING}, got {self.packing!r}.")
        if self.scope not in SCOPES:
            raise ModAdaptError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        if self.pack_bucket is not None and (
            isinstance(self.pack_bucket, bool) or not isinstance(self.pack_bucket, int) or self.pack_bucket < 1
        ):
            raise ModAdaptError(f"pack_bucket must be a positive int or None, got {self.pack_bucket!r}.")
        if self.pack_reserve is not None and self.pack_reserve != "auto":
            share = self.pack_reserve
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
                raise ModAdaptError(f"pack_reserve must be a share in (0, 1], 'auto' or None, got {share!r}.")
            self.pack_reserve = float(share)
        if not isinstance(self.router_kwargs, dict):
            raise ModAdaptError("router_kwargs must be a dict of router arguments.")
        if not isinstance(self.adapter_kwargs, dict):
            raise ModAdaptError("adapter_kwargs must be a dict of adapter options.")
        self.layers = normalize_layer_spec(self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModAdaptError(f"unknown ModConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def field_help(name: str) -> str:
    """The help text of a ModConfig field (shared by the CLI and docs)."""
    for f in fields(ModConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)


def parse_router_args(items: list[str], flag: str = "--router-arg") -> dict[str, Any]:
    """`KEY=VALUE` strings (``--router-arg``, ``--adapter-arg``) as `router_kwargs` /
    `adapter_kwargs`; values are parsed as JSON when they can be (numbers, bools)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ModAdaptError(f"{flag} expects KEY=VALUE, got {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def normalize_layer_spec(spec: Any) -> str | list[int]:
    """Turn a layer spec into a named rule or a sorted list of ints, each named once (not yet
    range-checked)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text in LAYER_RULES:
            return text
        if text.startswith(EVENLY):
            evenly_count(text)  # a malformed count fails here, early
            return text
        if text.startswith(FROM_REPORT):
            from .metrics.selection import read_selection

            read_selection(text[len(FROM_REPORT) :])  # a missing or corrupt report fails here, early
            return text
        try:
            spec = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ModAdaptError(
                f"layers {text!r} is not a layer list; use e.g. '1,3,5', 'evenly:4', or one of "
                f"{', '.join(LAYER_RULES)}."
            ) from None
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ModAdaptError("layers is empty; name at least one layer to convert.")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise ModAdaptError(f"layers must be integers, got {list(spec)!r}.")
        twice = sorted({i for i in spec if list(spec).count(i) > 1})
        if twice:
            raise ModAdaptError(f"layers {list(spec)} names layer {twice[0]} more than once; name each layer once.")
        return sorted(spec)
    raise ModAdaptError(f"layers must be a list of ints, 'evenly:N' or one of {LAYER_RULES}, got {spec!r}.")


def evenly_count(spec: str) -> int:
    """N of an `evenly:N` rule (a positive integer)."""
    count = spec[len(EVENLY) :].strip()
    if not count.isdigit() or int(count) < 1:
        raise ModAdaptError(f"layers {spec!r}: evenly:N needs a positive integer N, e.g. 'evenly:4'.")
    return int(count)


def evenly_spaced(count: int, candidates: list[int]) -> list[int]:
    """`count` of `candidates`, one in the middle of each of `count` equal stretches (of layers
    1..11: 6 gives 1, 3, 5, 7, 9, 11; 4 gives 2, 5, 7, 10): the placement of evenly spaced layer
    deletion, which the quality benchmark found the strongest place for routers too."""
    if not 0 < count <= len(candidates):
        raise ModAdaptError(
            f"evenly:{count} asks for {count} layers, but this model has {len(candidates)} convertible "
            f"layers; choose 1 to {len(candidates)}."
        )
    stretch = len(candidates) / count
    return [candidates[math.floor((i + 0.5) * stretch)] for i in range(count)]


def is_layer_rule(spec) -> bool:
    """Whether `spec` is a rule (which passes over the layers a family keeps dense), not a list."""
    return isinstance(spec, str) and (spec in LAYER_RULES or spec.startswith(EVENLY))


def resolve_layers(spec: str | list[int], num_layers: int, convertible: list[int] | None = None) -> list[int]:
    """Resolve a layer spec against a stack of `num_layers` layers; layer 0 is never allowed. A
    rule picks among `convertible` (default: 1 .. num_layers - 1); a list is checked as given."""
    if convertible is None:
        convertible = list(range(1, num_layers))
    if spec == "every-other":
        layers = [i for i in range(1, num_layers, 2) if i in convertible]
    elif spec == "all-but-first":
        layers = list(convertible)
    elif isinstance(spec, str) and spec.startswith(EVENLY):
        layers = evenly_spaced(evenly_count(spec), convertible) if convertible else []
    elif isinstance(spec, str) and spec.startswith(FROM_REPORT):
        from .metrics.selection import read_selection

        layers, analysed = read_selection(spec[len(FROM_REPORT) :])
        if analysed != num_layers:
            raise ModAdaptError(
                f"--layers {spec}: that report analysed a model with {analysed} layers, but this model has "
                f"{num_layers}; analyze this model instead."
            )
        return resolve_layers(layers, num_layers)
    else:
        layers = list(spec)
        bad = [i for i in layers if i < 0 or i >= num_layers]
        if bad:
            raise ModAdaptError(
                f"layer index {bad[0]} is out of range: the model has {num_layers} layers (0..{num_layers - 1})."
            )
        if 0 in layers:
            raise ModAdaptError(
                "layer 0 cannot be converted: the first layer sizes the cache and masks that every "
                "later layer relies on. Choose layers from 1 on."
            )
    if not layers:
        raise ModAdaptError(f"the layer rule {spec!r} selects no layer in a {num_layers}-layer model.")
    return layers
