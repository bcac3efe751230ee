"""The Adapter contract: everything model-specific about running a layer on a token subset."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..attention_probe import AttentionProbe

#: `callback(layer index, attention probabilities [B, H, T, T], causal)`, one layer at a time.
AttentionMapCallback = Callable[[int, torch.Tensor, bool], None]


@dataclass
class TokenRoles:
    """Per-token roles of one forward, derived from its inputs (never from fixed counts).

    Attributes:
        real: `[B, T]` bool, False for padding; None when there is no padding (`padding_free`: an
            all-true mask stays where reading it would sync, e.g. a `pack_reserve` forward).
        forced: `[B, T]` bool, tokens every MoD layer must process; None when there are none.
        extra: Named `[B, T]` role masks a router may use (e.g. ``"image"``).
    """

    real: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


_HOST_READS = threading.local()


@contextlib.contextmanager
def no_host_reads():
    """Within it, `padding_free` answers without reading the device: set around `token_roles` for
    a forward that must not wait for the GPU (`ModConfig.pack_reserve`'s one check per forward)."""
    before = getattr(_HOST_READS, "off", False)
    _HOST_READS.off = True
    try:
        yield
    finally:
        _HOST_READS.off = before


def host_reads_allowed() -> bool:
    """Whether `token_roles` may read a mask on the host to simplify its roles (a host sync): not
    while compiling, nor inside `no_host_reads()`. Without the read the roles keep their masks,
    which is always correct, only slower for the layers' kernels."""
    return not torch.compiler.is_compiling() and not getattr(_HOST_READS, "off", False)


def padding_free(real: torch.Tensor | None) -> bool:
    """Whether the `[B, T]` bool mask `real` marks no padding, so that `TokenRoles.real` may be None
    (MoD layers then take the causal path without a mask); False where host reads are not allowed."""
    return real is not None and host_reads_allowed() and bool(real.all())


@dataclass
class LayerCall:
    """How one layer is called: which arguments hold what, and how its attention behaves.

    Attributes:
        hidden: Name of the hidden-states argument.
        mask: Name of the attention-mask argument (rebuilt for the subset), or None.
        cache: Name of the KV-cache argument, or None.
        position_ids: Name of the position-ids argument, or None.
        per_token: Arguments whose dim 1 is the sequence (tensors or tuples of tensors); they are
            gathered to the subset, e.g. RoPE ``position_embeddings``.
        causal: Whether the layer's attention is causal.
        window: Sliding-window size of this layer's attention, or None.
        attn_implementation: Returns the attention kernel name now in use (read at call time,
            since users may switch it after conversion).
        prefix_tokens: Leading sequence positions that are always processed (forced role).
        packed_attention: Returns a context manager inside which the layer's attention runs
            `modadapt.varlen`'s packed segments (None: the layer cannot run packed).
        skipped: For a sublayer (`ModConfig.scope` 'attention' or 'mlp'), whose output its caller
            adds to the residual: what it returns for tokens it skips, from its input (zeros; an
            attention module `(zeros, None)`); a kept token then gets `gate * f(x)`. None: a
            block, which returns the residual stream (a skipped token passes unchanged, a kept
            one gets `x + gate * (f(x) - x)`).
        token_wise: The module treats every token on its own (an MLP): the kept tokens of all
            rows may always run as one packed sequence, no attention kernel needed.
        output_norm: For a sublayer whose output the layer normalises before adding it to the
            residual (post-norm layers: Gemma 2/3, OLMo 2), that norm: the gate scales the norm's
            output instead (a norm would undo it), so a kept token still gets `g * norm(f(x))`.
    """

    hidden: str
    mask: str | None
    cache: str | None
    position_ids: str | None
    per_token: tuple[str, ...]
    causal: bool
    window: int | None
    attn_implementation: Callable[[], str]
    signature: inspect.Signature | None = None
    prefix_tokens: int = 0
    packed_attention: Callable[[], Any] | None = None
    skipped: Callable[[torch.Tensor], Any] | None = None
    token_wise: bool = False
    output_norm: nn.Module | None = None
    positional_names: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        """Positional parameter names of the forward (after `self`), to bind calls cheaply."""
        if self.signature is not None:
            kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params = list(self.signature.parameters.values())[1:]
            if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
                raise TypeError("layers whose forward takes *args are not supported")
            self.positional_names = tuple(p.name for p in params if p.kind in kinds)


@dataclass
class DecodeParts:
    """What `modadapt.GraphedDecoder` runs its decode steps with (`Adapter.decode_parts`).

    Attributes:
        embed: Token ids `[B, T]` to hidden states `[B, T, D]`.
        rotary: `(hidden, position_ids)` to the `position_embeddings` the layers take (with
            `rotary_keys`: a dict of them, one per key); None: the layers take none (positions
            enter through `position_embed`).
        norm: The final norm, before `head`.
        head: Hidden states to logits.
        kv_heads: K/V heads of each layer's attention.
        head_dim: Size of one head.
        windows: Per layer, the sliding window of its attention (a query at position `p` sees
            keys at positions `> p - window`), or None: full attention.
        static_attention: Returns a context manager inside which the layers' attention reads the
            step's static cache (`modadapt.decoding.static_cache`), taking its `KeyLengths` where
            they take their attention mask.
        prefill: `(input_ids, attention_mask, position_ids, **inputs) -> (last logits [B, V], cache
            layers)`: the prompt (`inputs`: a multimodal model's `pixel_values`) run with a fresh KV cache
            that keeps every token, a sliding layer's too; each cache layer holds `keys` and
            `values` `[B, Hk, n, d]`, a MoD layer's also `mod_valid` (its real slots) and
            `mod_index` (each slot's sequence index).
        not_capturable: Why the decode step cannot be captured as CUDA graphs (a host sync in
            the family's modeling code), said as the error `GraphedDecoder(cuda_graphs=True)`
            raises; None: it can be.
        rotary_keys: Per layer, the key of `rotary`'s output it takes (Gemma 3: its layer type,
            local and global RoPE); None: `rotary` gives one for every layer.
        position_embed: Position ids `[B, T]` to embeddings `[B, T, D]` added to `embed`'s output
            (learned absolute positions: GPT-2's `wpe`); None: the model has none.
        capture_kernels: Returns a context manager entered around the decode step's warm-up and
            capture: inside it the family's modeling code runs kernels a CUDA graph can hold where
            its usual ones sync with the host (a mixture of experts whose grouped matmul has no
            device kernel for its dtype); the default changes nothing.
    """

    embed: nn.Module
    rotary: nn.Module | None
    norm: nn.Module
    head: nn.Module
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    static_attention: Callable[[], ContextManager[None]]
    prefill: Callable[..., tuple[torch.Tensor, list]]
    not_capturable: str | None = None
    rotary_keys: tuple | None = None
    position_embed: nn.Module | None = None
    capture_kernels: Callable[[], ContextManager[None]] = contextlib.nullcontext


class Adapter:
    """Base class of adapters; one per model family, registered through the plugin hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Adapter options (`ModConfig.adapter_kwargs`) and their defaults; unknown ones are an error.
    options: ClassVar[dict] = {}

    def configure(self, **options: Any) -> None:
        """Take the conversion's adapter options (validated against `options`), kept as `self.settings`."""
        from ..errors import ModAdaptError

        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ModAdaptError(f"adapter {self.name!r} has no option {unknown[0]!r}; its options are: {known}.")
        self.settings = {**self.options, **options}

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles `model`."""
        raise NotImplementedError

    def unsupported_reason(self, model: nn.Module) -> str | None:
        """Why a model this adapter nearly matches cannot be converted (for a clear error)."""
        return None

    def layer_stack(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        """The module that runs the stack (its inputs carry the token roles) and the stack."""
        raise NotImplementedError

    def hidden_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def validate_layers(self, model: nn.Module, layers: list[int]) -> None:
        """Raise ModAdaptError for layers this family cannot convert (layer 0 is checked already)."""

    def layer_call(self, model: nn.Module, layer: nn.Module, index: int) -> LayerCall:
        raise NotImplementedError

    def token_roles(self, stack_owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> TokenRoles:
        """Token roles of the forward about to run, from the stack owner's call arguments (or,
        when `roles_source` names a module, from that module's call arguments)."""
        return TokenRoles()

    def roles_source(self, model: nn.Module) -> nn.Module | None:
        """The module whose call carries the inputs the roles come from, when the stack owner does
        not see them (LLaVA: the top-level model gets `input_ids` and `labels`, its language model
        only embeddings). None: the stack owner. Its call must run the stack at most once."""
        return None

    def attention_probe(self, model: nn.Module, layers: list[int]) -> AttentionProbe:
        """Start recording the query/key tensors of `layers` on every forward, leaving the
        attention kernels as they are (see `modadapt.attention_probe`). Used by attention-map
        routing and ARank; `remove()` on the result detaches it."""
        from ..errors import ModAdaptError

        raise ModAdaptError(f"adapter {self.name!r} cannot observe attention maps.")

    def sublayer_call(self, model: nn.Module, layer: nn.Module, index: int, scope: str) -> tuple[nn.Module, LayerCall]:
        """For `ModConfig.scope` 'attention' or 'mlp': the sublayer of `layer` (stack index `index`)
        that MoD routes, and how it is called (`LayerCall.skipped` set: it returns what its caller
        adds to the residual). Raise ModAdaptError, in one line, for layers that cannot be split."""
        from ..errors import ModAdaptError

        raise ModAdaptError(
            f"adapter {self.name!r} cannot route a layer's sublayers (scope={scope!r}); use scope='block'."
        )

    def cached_tokens(self, cache: Any, layer_index: int) -> int:
        """How many tokens layer `layer_index` has seen before this call, from the layer call's
        cache argument: what a routed sublayer without a cache of its own (scope 'mlp') takes
        positions and decoding from. 0: no cache."""
        return 0

    def mod_cache_layer(self, cache: Any, layer_index: int) -> Any:
        """The KV-cache layer of MoD layer `layer_index` in `cache` (the layer's `cache` argument),
        given the bookkeeping a MoD layer keeps beside its K/V (see `adapters.hf.kv_cache`):
        `mod_seen`, `mod_past`, `mod_record`, ... Only called for layers whose `LayerCall` names a
        cache argument; a family without a KV cache needs nothing here."""
        from ..errors import ModAdaptError

        raise ModAdaptError(f"adapter {self.name!r} keeps no KV cache for MoD layers.")

    def attach(self, model: nn.Module, state: Any) -> list:
        """Called by `convert` once the model is converted (`state`: its `ModelState`): install
        everything the family puts on the converted model itself, and keep what it needs later in
        `state.family`. The transformers adapters attach two things here: a `save_pretrained`
        that writes a modadapt directory (`adapters.hf.auto`) and, in a mixture-of-experts model,
        the expert routers' statistics and load-balancing loss over the kept tokens only
        (`adapters.hf.moe`). Returns their handles (anything with `remove()`), which `unload`
        removes. Default: none."""
        return []

    def expert_stats(self, model: nn.Module) -> list[dict]:
        """Per mixture-of-experts block of a converted model, what its experts' router did in the
        last forward, counting the real tokens that reached it (see
        `modadapt.metrics.routing_stats.expert_stats`). Default: no experts."""
        return []

    def expert_router(self, model: nn.Module, mlp: nn.Module) -> nn.Module | None:
        """The router of the mixture of experts `mlp` (a layer's MLP), for routers that change
        how it routes (`noop-expert` adds a no-op expert to it): a module whose call takes the
        tokens' hidden states `[N, D]` and returns `(logits [N, E], weights [N, k], indices
        [N, k])`, the top-k experts each token goes to and their weights, which the experts then
        apply. None: `mlp` has no experts. Default: none."""
        return None

    def sublayer_weights(self, model: nn.Module, layer: nn.Module) -> dict[str, int] | None:
        """The weights of `layer`'s linear maps that one token passes through, per sublayer:
        ``{"attention": ..., "mlp": ...}`` (a mixture of experts: its router and the top-k
        experts' share of the expert weights; a MoD router's own excluded), for the FLOPs model
        (`modadapt.metrics.flops`); a mixture of experts adds ``"expert"`` (the weights of one
        expert, what one of a token's top-k slots costs) and ``"top_k"``. None: the layer's
        linear maps count as one block."""
        return None

    def decode_parts(self, model: nn.Module) -> DecodeParts:
        """The parts `GraphedDecoder` decodes `model` with; raise ModAdaptError, saying which
        models are supported, when this family's models cannot run graphed decode steps."""
        from ..errors import ModAdaptError

        raise ModAdaptError(f"graphed decoding supports no model of adapter {self.name!r} ({type(model).__name__}).")

    def calibration_kind(self, model: nn.Module) -> str | None:
        """What calibration data `modadapt analyze` feeds this family's models: ``"text"``
        (token ids), ``"images"`` (pixel batches at the model's input size) or ``"llava"``
        (images with prompts, LLaVA-format JSON); None: none of these."""
        return None

    def is_linear_map(self, module: nn.Module) -> bool:
        """Whether `module` is one of the family's linear maps (LoRA targets them): `nn.Linear`,
        and whatever the family uses besides (GPT-2's `Conv1D`)."""
        return isinstance(module, nn.Linear)

    def transposed_linear_weights(self, model: nn.Module) -> bool:
        """Whether the model's linear maps store their weight as `[in, out]` (GPT-2's `Conv1D`;
        LoRA's `fan_in_fan_out`)."""
        return False

    def analysis_layer_stack(self, model: nn.Module) -> nn.ModuleList | None:
        """The layer stack of a model of this adapter's library that no adapter converts (an
        encoder, say), so that analysis (ARank, cosine) still runs on it. None: not one it knows."""
        return None

    def attention_maps(
        self, model: nn.Module, layers: nn.ModuleList, callback: AttentionMapCallback
    ) -> ContextManager[None]:
        """A context inside which each forward hands `callback` every layer's attention
        probabilities, with the kernel switched to one that materialises them inside the context
        only: ARank's route for models an attention probe cannot observe."""
        from ..errors import ModAdaptError

        raise ModAdaptError(f"adapter {self.name!r} cannot materialise attention maps.")

    def example_inputs(self, model: nn.Module, batch: int, length: int, seed: int) -> dict[str, Any] | None:
        """Keyword arguments of a small random forward of `model` (token ids of about `length`
        tokens, images, ...), from which the conformance kits (`modadapt.testing`) check any
        router on this family. None: the family offers none, and the kits skip its models."""
        return None

    # --- persistence ---------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> dict:
        """JSON-able description from which `build` can recreate the architecture."""
        raise NotImplementedError

    def save_base(self, model: nn.Module, directory: str) -> None:
        """Write what `build` needs besides `describe()` (e.g. the model's config file)."""

    def build(self, directory: str, description: dict) -> nn.Module:
        """Recreate the (dense, randomly initialised) architecture saved in `directory`."""
        raise NotImplementedError


def contract_violation(cls: Any) -> str | None:
    """Why `cls` cannot be registered as an adapter (None: it honours the contract)."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        return f"{cls!r} is not a subclass of modadapt.adapters.Adapter"
    for method in ("matches", "layer_stack", "hidden_size", "layer_call"):
        if getattr(cls, method) is getattr(Adapter, method):
            return f"{cls.__qualname__} does not implement `{method}`"
    return None
