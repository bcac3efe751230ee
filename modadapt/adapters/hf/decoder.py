"""Hugging Face decoder-only LLMs (Llama, Qwen2/3, Mistral, Gemma 1-3, OLMo 2, Phi-3, GPT-2, and the
mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE), found generically.

The layer stack is the `nn.ModuleList` of the decoder (`get_decoder()`) whose layers are of a class
named in `_no_split_modules`; no modeling code is copied per family. The KV-cache bookkeeping of
MoD layers is in `kv_cache`, the attention functions registered with transformers in `attention`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn

from ...attention_probe import AttentionProbe
from ...errors import ModAdaptError
from ...mod_layer import state_of
from ..base import Adapter, AttentionMapCallback, DecodeParts, LayerCall, TokenRoles, padding_free
from .attention import (
    PROBE_ATTENTION,
    PROBE_EAGER_ATTENTION,
    STATIC_ATTENTION,
    VARLEN_ATTENTION,
    register_attention_functions,
    use_attention,
)
from .attention_maps import eager_attention_maps
from .auto import attach_save_pretrained, base_config, wrap_config
from .kv_cache import mod_cache_layer
from .moe import attach_experts, expert_router, expert_weights, router_spec
from .versions import cache_argument

#: Families converted, trained and generated with in the test suite.
TESTED_FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "phi3",
    "gpt2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
#: The families `GraphedDecoder` runs: Llama-style (token embedding, rotary embedding, final norm)
#: and GPT-2 (token and learned position embeddings, final norm).
GRAPHED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt2",
)


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and hasattr(model, "get_decoder")


class HFDecoderAdapter(Adapter):
    name = "hf-decoder"
    description = "Hugging Face decoder-only LLMs: " + ", ".join(TESTED_FAMILIES)

    def matches(self, model: nn.Module) -> bool:
        return _is_causal_lm(model) and getattr(model.config, "model_type", None) in TESTED_FAMILIES

    def layer_stack(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        decoder = model.get_decoder()
        names = set(getattr(model, "_no_split_modules", None) or [])
        for child in decoder.children():  # by class name, also of a subclass (FSDP2's FSDP<Layer>)
            if isinstance(child, nn.ModuleList) and len(child) and names & {c.__name__ for c in type(child[0]).__mro__}:
                return decoder, child
        # A converted model's layers carry a `Mod` prefix; look through it.
        for child in decoder.children():
            if isinstance(child, nn.ModuleList) and len(child) and hasattr(child[0], "_mod_original"):
                return decoder, child
        raise ModAdaptError(f"could not find the decoder layers of {type(model).__name__}.")

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.get_text_config(decoder=True).hidden_size

    def validate_layers(self, model: nn.Module, layers: list[int]) -> None:
        # transformers sizes each attention type's mask from the first layer of that type.
        types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
        if types:
            firsts = {t: types.index(t) for t in set(types)}
            for t, first in firsts.items():
                if first in layers:
                    raise ModAdaptError(
                        f"layer {first} is the first {t!r} layer; transformers sizes that attention type's "
                        "mask from it, so it cannot be converted. Choose other layers."
                    )

    def layer_call(self, model: nn.Module, layer: nn.Module, index: int) -> LayerCall:
        forward = getattr(type(layer), "_mod_original", type(layer)).forward
        signature = inspect.signature(forward)
        params = signature.parameters
        cache = cache_argument(forward)  # `cache` from transformers 5.24, `past_key_values` before
        config = model.config.get_text_config(decoder=True)
        register_attention_functions()  # what `packed_attention` switches to (once per process)
        return LayerCall(
            hidden=next(iter(list(params)[1:])),
            mask="attention_mask",
            cache=cache,
            position_ids="position_ids",
            per_token=("position_embeddings",),
            causal=True,
            window=_sliding_window(config, index),
            attn_implementation=functools.partial(getattr, config, "_attn_implementation"),
            signature=signature,
            # The packed kernel has no soft-capping (Gemma 2's attention): such layers pad.
            packed_attention=None
            if getattr(config, "attn_logit_softcapping", None)
            else functools.partial(use_attention, config, VARLEN_ATTENTION),
        )

    def token_roles(self, stack_owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> TokenRoles:
        mask = kwargs.get("attention_mask")
        if mask is None and args:  # passed by position (transformers' own callers pass names)
            bound = _forward_signature(type(stack_owner)).bind_partial(stack_owner, *args, **kwargs)
            mask = bound.arguments.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return TokenRoles()
        real = mask.bool()
        return TokenRoles() if padding_free(real) else TokenRoles(real=real)

    def attach(self, model: nn.Module, state: Any) -> list:
        """A `save_pretrained` that writes a modadapt directory (`auto`) and, in a mixture-of-experts
        model (Mixtral, Qwen2/3-MoE), the expert routers' load-balancing loss and counts over the
        kept real tokens (`moe`)."""
        stack_owner, stack = self.layer_stack(model)
        return [*attach_save_pretrained(model), *attach_experts(model, state, stack_owner, stack)]

    def expert_stats(self, model: nn.Module) -> list[dict]:
        state = state_of(model)
        recorder = state.family.get("experts") if state is not None else None
        return recorder.stats() if recorder is not None else []

    def expert_router(self, model: nn.Module, mlp: nn.Module) -> nn.Module | None:
        """The family's `*TopKRouter` in a Mixtral / Qwen2-MoE / Qwen3-MoE block (the class the
        model records `router_logits` from): `(logits, weights, indices)` per token."""
        return expert_router(model, mlp)

    def sublayer_weights(self, model: nn.Module, layer: nn.Module) -> dict[str, int] | None:
        """The layer's attention module (its first child named `*Attention`) and its `mlp`; expert
        banks count their top-k share and the experts' router (`moe.expert_weights`); a MoD
        router inside a sublayer is not counted."""
        attention, mlp = _sublayers(layer)
        if attention is None or mlp is None:
            return None

        def linear(module: nn.Module) -> int:
            return sum(
                m.weight.numel()
                for name, m in module.named_modules()
                if self.is_linear_map(m) and not name.startswith("router")
            )

        parts = {"attention": linear(attention), "mlp": linear(mlp)}
        experts = expert_weights(model, mlp)
        if experts is not None:
            parts["mlp"] += experts["router"] + experts["top_k"] * experts["expert"]
            parts.update(expert=experts["expert"], top_k=experts["top_k"])
        return parts

    def sublayer_call(self, model: nn.Module, layer: nn.Module, index: int, scope: str) -> tuple[nn.Module, LayerCall]:
        """The layer's attention module (its first `*Attention` child) or its `mlp`. A layer that
        normalises each sublayer's output before the residual (`post_feedforward_layernorm`:
        Gemma 2/3, OLMo 2, whose `post_attention_layernorm` then follows the attention) names
        that norm as the sublayer's `output_norm`, which applies the gate."""
        kind = getattr(model.config.get_text_config(decoder=True), "model_type", type(model).__name__)
        attention, mlp = _sublayers(layer)
        if attention is None or mlp is None:
            raise ModAdaptError(
                f"scope={scope!r} needs layers with an attention module and an mlp; {kind!r} "
                f"layer {index} ({type(layer).__name__}) has not both: use scope='block'."
            )
        norm = None
        if isinstance(getattr(layer, "post_feedforward_layernorm", None), nn.Module):
            norm = layer.post_attention_layernorm if scope == "attention" else layer.post_feedforward_layernorm
        block = self.layer_call(model, layer, index)
        module = attention if scope == "attention" else mlp
        forward = getattr(type(module), "_mod_original", type(module)).forward
        signature = inspect.signature(forward)
        hidden = next(iter(list(signature.parameters)[1:]))
        if scope == "attention":
            cache = cache_argument(forward, default=block.cache)  # `cache` from transformers 5.24
            return module, dataclasses.replace(
                block, hidden=hidden, cache=cache, signature=signature, skipped=_zeros_and_no_weights, output_norm=norm
            )
        return module, LayerCall(
            hidden=hidden,
            mask=None,
            cache=None,
            position_ids=None,
            per_token=(),
            causal=True,
            window=None,
            attn_implementation=block.attn_implementation,
            signature=signature,
            skipped=torch.zeros_like,
            token_wise=True,
            output_norm=norm,
        )

    def cached_tokens(self, cache: Any, layer_index: int) -> int:
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) <= layer_index:
            return 0
        return int(layers[layer_index].get_seq_length())

    def mod_cache_layer(self, cache: Any, layer_index: int) -> Any:
        """The transformers cache layer of MoD layer `layer_index`, with its bookkeeping (`kv_cache`)."""
        return mod_cache_layer(cache, layer_index)

    def decode_parts(self, model: nn.Module) -> DecodeParts:
        """The decoder's token embedding (Gemma's scales by sqrt(hidden) itself), its position
        encoding: a rotary embedding (Gemma 3's: one per layer type, `rotary_keys`) or learned
        absolute position embeddings added to the token embedding (GPT-2's `wpe`), its final norm,
        the LM head (soft-capped as the model caps its logits: Gemma 2), each layer's sliding
        window (`layer_types` and `sliding_window`, `use_sliding_window`: the config's), and the
        attention shape of a `GRAPHED_FAMILIES` model (or its language model's)."""
        config = model.config.get_text_config(decoder=True)
        if getattr(config, "model_type", None) not in GRAPHED_FAMILIES or not hasattr(model, "get_decoder"):
            raise ModAdaptError(
                f"graphed decoding supports {', '.join(GRAPHED_FAMILIES)} decoders, not "
                f"{getattr(config, 'model_type', type(model).__name__)!r}; decode it with model.generate."
            )
        decoder = model.get_decoder()
        found = {part: _decoder_part(decoder, names) for part, names in _DECODER_PARTS.items()}
        for part in ("embed", "norm"):
            if found[part] is None:
                raise ModAdaptError(
                    f"{type(decoder).__name__} has none of {', '.join(map(repr, _DECODER_PARTS[part]))}: "
                    "not a decoder GraphedDecoder knows."
                )
        if found["rotary"] is None and found["position_embed"] is None:
            raise ModAdaptError(
                f"{type(decoder).__name__} has neither a rotary embedding nor position embeddings: "
                "not a decoder GraphedDecoder knows."
            )
        register_attention_functions()
        layers = len(self.layer_stack(model)[1])
        rotary, rotary_keys = found["rotary"], None
        if rotary is not None and "layer_type" in inspect.signature(type(rotary).forward).parameters:
            rotary_keys = tuple(config.layer_types[:layers])  # Gemma 3: local and global RoPE
            rotary = functools.partial(_rotary_per_type, found["rotary"], tuple(sorted(set(rotary_keys))))
        head = model.get_output_embeddings()
        cap = getattr(config, "final_logit_softcapping", None)
        return DecodeParts(
            embed=found["embed"],
            rotary=rotary,
            norm=found["norm"],
            head=SoftCappedHead(head, cap) if cap else head,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            windows=tuple(_sliding_window(config, i) for i in range(layers)),
            static_attention=functools.partial(use_attention, config, STATIC_ATTENTION),
            prefill=functools.partial(_prefill, model),
            not_capturable=_not_capturable(model, config),
            capture_kernels=functools.partial(_graph_safe_experts, model),
            rotary_keys=rotary_keys,
            position_embed=found["position_embed"],
        )

    def calibration_kind(self, model: nn.Module) -> str:
        return "text"

    def is_linear_map(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or _is_conv1d(module)

    def transposed_linear_weights(self, model: nn.Module) -> bool:
        return any(_is_conv1d(m) for m in model.modules())

    def example_inputs(self, model: nn.Module, batch: int, length: int, seed: int) -> dict[str, Any]:
        """Random token ids in [1, vocab): 0 is left for padding."""
        vocab = model.config.get_text_config(decoder=True).vocab_size
        generator = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(1, vocab, (batch, length), generator=generator)}

    def attention_probe(self, model: nn.Module, layers: list[int]) -> AttentionProbe:
        """Points the model's attention at `PROBE_ATTENTION` (records, then runs SDPA; for an eager
        model `PROBE_EAGER_ATTENTION`, which runs the family's eager attention) while the probe is
        attached; masks are built for the kernel it runs, so outputs do not change."""
        config = model.config.get_text_config(decoder=True)
        current = config._attn_implementation
        probing = _PROBES.get(current, current)
        if probing not in _PROBES.values():
            raise ModAdaptError(
                f"observing attention needs attn_implementation='sdpa' (or 'eager'), not {current!r}; "
                "load the model with attn_implementation='sdpa'."
            )
        _, stack = self.layer_stack(model)
        modules = []
        for i in layers:
            if not 0 <= i < len(stack):
                raise ModAdaptError(f"layer {i} is out of range: the model has {len(stack)} layers.")
            attn = next((m for m in stack[i].modules() if type(m).__name__.endswith("Attention")), None)
            if attn is None:
                raise ModAdaptError(f"layer {i} ({type(stack[i]).__name__}) has no attention module to observe.")
            modules.append((attn, i))
        register_attention_functions()
        probe = AttentionProbe(layers)
        for attn, i in modules:
            tags = attn.__dict__.setdefault("_modadapt_probes", [])
            tags.append((probe, i))
        model.config._attn_implementation = probing
        probe.on_remove(_DetachProbe(model, stack, [attn for attn, _ in modules], probe))
        return probe

    def analysis_layer_stack(self, model: nn.Module) -> nn.ModuleList | None:
        """The `nn.ModuleList` whose layers are of a class named in `_no_split_modules`, in any
        transformers model (an encoder included)."""
        names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
                return module
        return None

    def attention_maps(
        self, model: nn.Module, layers: nn.ModuleList, callback: AttentionMapCallback
    ) -> ContextManager[None]:
        return eager_attention_maps(model, layers, callback)

    # --- persistence ---------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> dict:
        """The class, model type and attention kernel (transformers does not save the kernel, and
        versions differ in their default: 5.17 runs Gemma 2 with SDPA, which ignores its softcap)."""
        description = {"library": "transformers", "class": type(model).__name__, "model_type": model.config.model_type}
        kernel = model.config._attn_implementation
        kernel = next((k for k, v in _PROBES.items() if v == kernel), kernel)  # a probe observes this one
        if kernel in _PROBES:
            description["attn_implementation"] = kernel
        return description

    def save_base(self, model: nn.Module, directory: str) -> None:
        model.config.save_pretrained(directory)
        wrap_config(directory)  # a dense class must not load a MoD directory (see auto.py)

    def build(self, directory: str, description: dict) -> nn.Module:
        import transformers

        config = base_config(directory)
        cls = getattr(transformers, description.get("class", ""), None)
        if cls is None:
            raise ModAdaptError(
                f"{directory}: transformers has no model class {description.get('class')!r}; "
                "was it saved with a newer transformers?"
            )
        kernel = description.get("attn_implementation")
        return cls._from_config(config, **({"attn_implementation": kernel} if kernel else {}))


#: The decoder's modules `decode_parts` takes, each by the names the families give it (Llama-style
#: decoders first, then GPT-2's): the first present one.
_DECODER_PARTS = {
    "embed": ("embed_tokens", "wte"),
    "rotary": ("rotary_emb",),
    "position_embed": ("wpe",),
    "norm": ("norm", "ln_f"),
}


def _decoder_part(decoder: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(decoder, n) for n in names if isinstance(getattr(decoder, n, None), nn.Module)), None)


#: The probing attention function for each kernel it observes.
_PROBES = {"sdpa": PROBE_ATTENTION, "eager": PROBE_EAGER_ATTENTION}


class _DetachProbe:
    """Untags the probe's attention modules and restores the observed kernel once no probe is
    left. An object, not a closure, so that `copy.deepcopy(model)` gives the copy an undo bound
    to the copy."""

    def __init__(self, model: nn.Module, stack: nn.Module, modules: list, probe: AttentionProbe):
        self.model, self.stack, self.modules, self.probe = model, stack, modules, probe

    def __call__(self) -> None:
        for attn in self.modules:
            attn._modadapt_probes = [t for t in attn._modadapt_probes if t[0] is not self.probe]
        if not any(getattr(m, "_modadapt_probes", None) for m in self.stack.modules()):
            probing = self.model.config._attn_implementation
            self.model.config._attn_implementation = next((k for k, v in _PROBES.items() if v == probing), "sdpa")


def _prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    **inputs: Any,
) -> tuple[torch.Tensor, list]:
    """The prompt (with `inputs`: LLaVA's `pixel_values`) through the model with a fresh
    `DynamicCache`: the last logits and its layers. Made without the config, so that every layer
    is a `DynamicLayer` that keeps every token: the config's would give sliding layers a
    `DynamicSlidingWindowLayer`, which keeps the last `window - 1` slots only (the masks, built by
    layer type, are the same either way)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{cache_argument(model.forward): cache},
        use_cache=True,
        logits_to_keep=1,
        **inputs,
    )
    return out.logits[:, -1], cache.layers


class SoftCappedHead:
    """The LM head with the model's final logit soft-capping (Gemma 2: `cap * tanh(logits / cap)`,
    in the CausalLM's forward, which the decode step does not run)."""

    def __init__(self, head: nn.Module, cap: float):
        self.head, self.cap = head, float(cap)
        self.weight = head.weight
        self.out_features = getattr(head, "out_features", None) or head.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def _rotary_per_type(rotary: nn.Module, types: tuple, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Gemma 3's rotary embeddings: `{layer type: (cos, sin)}` (each type its own base)."""
    return {t: rotary(hidden, position_ids, t) for t in types}


def _not_capturable(model: nn.Module, config: Any) -> str | None:
    """Why `model`'s decode step cannot be captured: a mixture of experts run by transformers'
    eager expert loop (`experts_implementation="eager"`), which picks each expert's tokens with
    `nonzero`/`where`, host syncs that a CUDA graph cannot hold. The default `grouped_mm` is
    captured with bf16 weights and swapped for `batched_mm` otherwise (`_graph_safe_experts`).
    None: nothing known."""
    if router_spec(model) is None or getattr(config, "_experts_implementation", None) not in (None, "eager"):
        return None
    return (
        f"this {config.model_type!r} model runs its experts with transformers' eager expert loop, which syncs "
        "with the host (nonzero/where over each expert's tokens) and cannot be captured as a CUDA graph. Use "
        "GraphedDecoder(model, cuda_graphs=False) (the same decode pieces, eagerly), load the model with "
        "experts_implementation='grouped_mm', or decode with model.generate."
    )


@contextlib.contextmanager
def _graph_safe_experts(model: nn.Module) -> Iterator[None]:
    """Run `model`'s experts with transformers' `batched_mm` where they run `grouped_mm` on
    weights that are not bf16: torch's grouped matmul has a device kernel for bf16 only and loops
    over the groups on the host otherwise (a CPU-to-GPU copy that a capture refuses: seen with
    float32 Mixtral on the H200, torch 2.11). `batched_mm` gathers each token's expert weights
    on the device, so it is graph-safe, at the price of that gather: one expert matrix per token
    slot, `B x top_k` (times `K + 1` when speculating) per layer in the graph's memory pool, so a
    large model wants bf16 weights here. Every config the setter touches (sub-configs too) gets
    its own value back on exit."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        banks = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if (
            banks
            and getattr(config, "_experts_implementation", None) == "grouped_mm"
            and banks[0].dtype != torch.bfloat16
        ):
            configs[id(config)] = config
    saved = [(c, c._experts_implementation) for config in configs.values() for c in _config_tree(config)]
    for config in configs.values():
        config._experts_implementation = "batched_mm"  # transformers' setter sets the sub-configs too
    try:
        yield
    finally:
        for config, implementation in saved:  # parents first: a sub-config's own value comes last
            config._experts_implementation = implementation


def _config_tree(config: Any) -> list:
    """`config` and its sub-configs, recursively, parents first."""
    tree = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            tree += _config_tree(sub)
    return tree


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear map whose weight is stored `[in, out]`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight")


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _sublayers(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """A decoder layer's attention module (its first child named `*Attention`) and its `mlp`."""
    attention = next((m for m in layer.children() if type(m).__name__.endswith("Attention")), None)
    mlp = getattr(layer, "mlp", None)
    return attention, mlp if isinstance(mlp, nn.Module) else None


def _zeros_and_no_weights(hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
    """What a transformers attention module returns for tokens it skips: no output, no weights."""
    return torch.zeros_like(hidden), None


def _sliding_window(config: Any, index: int) -> int | None:
    """Layer `index`'s sliding window: the config's `sliding_window` unless `use_sliding_window`
    is off (Qwen2/3 and their MoE) or `layer_types` makes the layer a full-attention one."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:  # (Qwen2-MoE: 0 for none)
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[index] == "sliding_attention" else None
    return window
