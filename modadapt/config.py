"""`ModConfig`: what to convert and how. Every field's help text is reused by the CLI and docs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ModAdaptError

LAYER_RULES = ("every-other", "all-but-first")
FROM_REPORT = "from:"
INFERENCE_ROUTING = ("causal", "topk")
PACKING = ("auto", "packed", "padded")
SCOPES = ("block", "attention", "mlp")


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
            "'every-other' (1, 3, 5, ...), 'all-but-first', or 'from:REPORT_DIR' (the layers a "
            "`modadapt analyze` report selected). Layer 0 is never converted; the two rules pass over "
            "the layers a family keeps dense (Gemma 2/3: the first layer of each attention type)."
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
        if text.startswith(FROM_REPORT):
            from .metrics.selection import read_selection

            read_selection(text[len(FROM_REPORT) :])  # a missing or corrupt report fails here, early
            return text
        try:
            spec = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ModAdaptError(
                f"layers {text!r} is not a layer list; use e.g. '1,3,5', or one of {', '.join(LAYER_RULES)}."
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
    raise ModAdaptError(f"layers must be a list of ints or one of {LAYER_RULES}, got {spec!r}.")


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Resolve a layer spec against a stack of `num_layers` layers; layer 0 is never allowed."""
    if spec == "every-other":
        layers = list(range(1, num_layers, 2))
    elif spec == "all-but-first":
        layers = list(range(1, num_layers))
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
