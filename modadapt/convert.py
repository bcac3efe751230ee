"""`convert` and `unload`: attach routers to a model in place, and take them off again."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from . import mod_layer, plugins
from .adapters.base import TokenRoles, no_host_reads
from .adapters.hf.versions import CACHE_ARGUMENTS
from .config import ModConfig, is_layer_rule, resolve_layers
from .deprecation import moved_names
from .errors import ModAdaptError
from .mod_layer import STATE_ATTR, Host, LayerState, ModelState, gate_output, mod_class, routed_module, ungate_output
from .plugins import get_router

__getattr__ = moved_names(
    __name__, {"find_adapter": "modadapt.plugins:find_adapter", "state_of": "modadapt.mod_layer:state_of"}
)


def convert(
    model: nn.Module, config: ModConfig | None = None, *, adapter: str | None = None, **overrides: Any
) -> nn.Module:
    """Convert `model` to Mixture-of-Depths in place and return it.

    Args:
        model: A supported model (see `modadapt list adapters`).
        config: What to convert; keyword arguments are a shortcut for its fields and override it.
        adapter: The registered adapter to use; None: the only one that claims the model.

    Nothing is changed when an error is raised.
    """
    known = {f.name for f in dataclasses.fields(ModConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModAdaptError(
            f"convert() got unknown option {unknown[0]!r}; ModConfig fields: {', '.join(sorted(known))}."
        )
    if config is None:
        config = ModConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if mod_layer.state_of(model) is not None:
        raise ModAdaptError("this model is already converted; call modadapt.unload(model) first.")
    adapter = plugins.find_adapter(model, adapter)
    adapter.configure(**config.adapter_kwargs)
    router_cls = get_router(config.router).obj
    reason = router_cls.unsupported_reason(model, adapter)
    if reason is not None:
        raise ModAdaptError(reason)
    config = routed_scope(config, router_cls)
    stack_owner, layers = adapter.layer_stack(model)
    if is_layer_rule(config.layers):  # a rule passes over the layers the family keeps dense
        convertible = [i for i in range(1, len(layers)) if accepts_layer(adapter, model, i)]
        indices = resolve_layers(config.layers, len(layers), convertible)
        if not indices:
            raise ModAdaptError(f"the layer rule {config.layers!r} selects no layer this model can convert.")
    else:
        indices = resolve_layers(config.layers, len(layers))
    adapter.validate_layers(model, indices)
    hidden = adapter.hidden_size(model)

    routers = {}
    for i in indices:  # build everything before touching the model: errors leave it unchanged
        reference = next(layers[i].parameters(), None)
        router = router_cls(hidden, config.capacity, i, **config.router_kwargs)
        if reference is not None:
            router = router.to(device=reference.device, dtype=reference.dtype)
        routers[i] = router
    calls = {i: adapter.layer_call(model, layers[i], i) for i in indices}
    # The module each MoD layer routes: the layer, or (scope attention / mlp) that sublayer of it.
    units = {i: (layers[i], calls[i]) for i in indices}
    if config.scope != "block":
        units = {i: adapter.sublayer_call(model, layers[i], i, config.scope) for i in indices}
    attached = router_cls.prepare_model(model, adapter, indices, routers)

    state = ModelState(config=config, adapter=adapter, layer_indices=indices)
    hosts = []
    for i in indices:
        unit, call = units[i]
        unit.__class__ = mod_class(type(unit))
        unit.router = routers[i]
        unit.mod_state = LayerState(index=i, call=call, model=state)
        state.layers.append(unit.mod_state)
        if call.output_norm is not None:
            gate_output(call.output_norm, unit.mod_state)
        if unit is not layers[i]:
            host = Host(unit.mod_state, calls[i])
            hosts += [
                layers[i].register_forward_pre_hook(host.before, with_kwargs=True),
                layers[i].register_forward_hook(host.after, with_kwargs=True, always_call=True),
            ]
    object.__setattr__(model, STATE_ATTR, state)
    _install_hooks(model, stack_owner, state)
    state.hooks.extend(hosts)
    state.hooks.extend(attached)
    state.hooks.extend(adapter.attach(model, state))
    return model


def routed_scope(config: ModConfig, router_cls: type) -> ModConfig:
    """`config` with a scope `router_cls` routes: as given, or the one sublayer a router routes
    (`Router.scopes`) when the config leaves the default 'block'; else a clear error."""
    scopes = router_cls.scopes
    if scopes is None or config.scope in scopes:
        return config
    if config.scope == "block" and len(scopes) == 1:
        return dataclasses.replace(config, scope=scopes[0])
    raise ModAdaptError(
        f"router {config.router!r} routes scope {' or '.join(map(repr, scopes))} only, not {config.scope!r}; "
        f"convert with scope={scopes[0]!r} (CLI: --scope {scopes[0]})."
    )


def accepts_layer(adapter, model: nn.Module, index: int) -> bool:
    """Whether `adapter` lets layer `index` of `model` be converted (`Adapter.validate_layers`)."""
    try:
        adapter.validate_layers(model, [index])
    except ModAdaptError:
        return False
    return True


def _holds_no_cache(module: nn.Module, kwargs: dict) -> bool:
    """Whether a call of the stack (or of the model around it, LLaVA's roles source) runs without
    a KV cache: none passed in, and none made (`use_cache` off, or left to a config that has it off;
    a vision-language config keeps it in its text config)."""
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        config = getattr(module, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        use_cache = getattr(text, "use_cache", False)
    return not use_cache


class _Hooks:
    """The model-level hooks; a class (not closures) so that `copy.deepcopy(model)` gives the copy
    hooks bound to the copy's own state."""

    def __init__(self, model: nn.Module, state: ModelState):
        self.model = model
        self.state = state
        self.pending: TokenRoles | None = None  # roles taken at the adapter's roles source

    def roles(self, module, args, kwargs) -> TokenRoles:
        """The adapter's token roles of this call; a forward whose layers pack into `pack_reserve`'s
        slots takes them without reading the device (its only host read is the kept counts' at its
        end). Layers that never pack (`packing="padded"`; top-k routing at inference, which has a
        static shape) keep the read: it spares them the masked path."""
        config = self.state.config
        reserved = (
            config.pack_reserve is not None
            and config.packing != "padded"
            and config.inference_routing == "causal"
            and not module.training
            and not self.state.pack_exact
            and _holds_no_cache(module, kwargs)
        )
        with no_host_reads() if reserved else contextlib.nullcontext():
            return self.state.adapter.token_roles(module, args, kwargs)

    def before_source(self, module, args, kwargs):
        self.pending = self.roles(module, args, kwargs)

    def after_source(self, module, args, kwargs, output):
        self.pending = None

    def before_stack(self, module, args, kwargs):
        for layer in self.state.layers:  # a loss is only reported by the forward that made it
            layer.last_aux = None
        if self.pending is not None:
            self.state.roles, self.pending = self.pending, None
        else:
            self.state.roles = self.roles(module, args, kwargs)
        self.state.cache_free_stack, self.state.pack_counts = _holds_no_cache(module, kwargs), []
        no_cache = all(kwargs.get(layer.call.cache) is None for layer in self.state.layers if layer.call.cache)
        if module.training and no_cache and kwargs.get("use_cache", False) is None:
            # A training forward has no use for a KV cache; not building one keeps it compilable.
            return args, {**kwargs, "use_cache": False}
        return None

    def after_stack(self, module, args, kwargs, output):
        roles, self.state.roles = self.state.roles, TokenRoles()  # never leak into a direct layer call
        checks, self.state.pack_counts, self.state.cache_free_stack = self.state.pack_counts, [], False
        if output is None or not checks or self.reserved_packs_fit(checks):  # the forward's one host read
            return None
        # Some layer kept more tokens than `ModConfig.pack_reserve` holds: run again, exact counts.
        self.state.pack_reruns += 1
        self.state.pack_exact, self.pending = True, roles
        try:
            output = module(*args, **kwargs)
        finally:
            self.state.pack_exact, self.pending = False, None  # (never True here before: no reserve then)
        if self.state.pack_reruns == 1 and self.state.config.pack_reserve != "auto":  # too small a setting
            kept = max(
                float(layer.last_keep.float().mean()) for layer in self.state.layers if layer.last_keep is not None
            )
            warnings.warn(
                f"pack_reserve {self.state.config.pack_reserve} holds fewer tokens than a MoD layer kept "
                f"({kept:.2f} of the call's), so the forward ran again with exact counts; set it above "
                "what the layers keep (model._modadapt_state.pack_reruns counts these runs).",
                stacklevel=2,
            )
        return output

    def reserved_packs_fit(self, checks: list) -> bool:
        """Read the forward's reserved packs' kept counts (its one host sync), teach each layer
        the largest share it kept in a call of at least `AUTO_RESERVE_MIN_TOKENS` tokens
        (`pack_reserve="auto"` reserves from it) and say whether every layer's kept tokens fit
        its slots (if not, the forward runs again with exact counts)."""
        counts = torch.stack([count for _, count, _, _ in checks]).tolist()
        for (layer, _, tokens, slots), kept in zip(checks, counts):  # in stack order
            if tokens >= mod_layer.AUTO_RESERVE_MIN_TOKENS:  # a short call's share is noise
                layer.reserve_share = max(layer.reserve_share or 0.0, kept / tokens)
            if kept > slots:  # the layers after it saw a cut selection: they teach nothing
                return False
        return True

    def after_model(self, module, args, kwargs, output):
        """Add the routers' auxiliary losses to the loss the model returns (labels given)."""
        if isinstance(output, tuple):  # return_dict=False: the loss comes first when labels were given
            if kwargs.get("labels") is None or not output or not isinstance(output[0], torch.Tensor):
                return output
            aux = aux_loss(self.model)
            return output if aux is None else (output[0] + aux.to(output[0].dtype), *output[1:])
        if not hasattr(output, "get"):
            return output
        aux, loss = aux_loss(self.model), output.get("loss")
        if loss is not None and aux is not None:
            if dataclasses.is_dataclass(output) and hasattr(output, "to_tuple"):
                # a ModelOutput: its type with a `router_aux_loss` field, which torch's pytree (DDP's
                # find_unused_parameters takes the output apart and builds it again) can rebuild
                values = {**output, "loss": loss + aux.to(loss.dtype), "router_aux_loss": aux}
                return output_with_router_aux_loss(type(output))(**values)
            output["loss"] = loss + aux.to(loss.dtype)
            output["router_aux_loss"] = aux
        elif hasattr(output, "to_tuple"):  # a ModelOutput: always answers `.router_aux_loss` (None:
            # no routing loss in this forward), as a plain attribute, so its keys stay the model's
            object.__setattr__(output, "router_aux_loss", aux)
        return output


_WITH_AUX: dict[type, type] = {}


def output_with_router_aux_loss(output_type: type) -> type:
    """The subclass of a ModelOutput dataclass with one more field, ``router_aux_loss`` (default
    None), made once per type and kept in this module under its name (so it pickles)."""
    made = _WITH_AUX.get(output_type)
    if made is None:
        name = f"{output_type.__name__}WithRouterAuxLoss"
        made = dataclasses.make_dataclass(
            name,
            [("router_aux_loss", "torch.Tensor | None", dataclasses.field(default=None))],
            bases=(output_type,),
            namespace={"__module__": __name__},
        )
        if name not in globals():
            globals()[name] = made
        _WITH_AUX[output_type] = made
    return made


def _install_hooks(model: nn.Module, stack_owner: nn.Module, state: ModelState) -> None:
    hooks = _Hooks(model, state)
    state.hooks = [
        stack_owner.register_forward_pre_hook(hooks.before_stack, with_kwargs=True),
        stack_owner.register_forward_hook(hooks.after_stack, with_kwargs=True, always_call=True),
    ]
    if stack_owner is not model:
        state.hooks.append(model.register_forward_hook(hooks.after_model, with_kwargs=True))
    source = state.adapter.roles_source(model)
    if source is not None and source is not stack_owner:
        state.hooks += [
            source.register_forward_pre_hook(hooks.before_source, with_kwargs=True),
            source.register_forward_hook(hooks.after_source, with_kwargs=True, always_call=True),
        ]


def mod_layers(model: nn.Module) -> list[nn.Module]:
    """The converted layers of `model`, in stack order: the modules that route (each carries
    `router` and `mod_state`), the layers themselves, or with `ModConfig.scope` 'attention' or
    'mlp' that sublayer of each."""
    state = mod_layer.state_of(model)
    if state is None:
        raise ModAdaptError("this model is not converted; call modadapt.convert(model, ...) first.")
    _, layers = state.adapter.layer_stack(model)
    return [routed_module(layers[i]) for i in state.layer_indices]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the router auxiliary losses of the model's last forward (None if there are none)."""
    state = mod_layer.state_of(model)
    if state is None:
        raise ModAdaptError("this model is not converted; call modadapt.convert(model, ...) first.")
    losses = [layer.last_aux.float() for layer in state.layers if layer.last_aux is not None]
    return torch.stack(losses).sum() if losses else None


def unload(model: nn.Module) -> nn.Module:
    """Remove every router and hook; the model's state dict is the original one again."""
    state = mod_layer.state_of(model)
    layers = mod_layers(model)
    for handle in state.hooks:
        handle.remove()
    for layer in layers:
        if layer.mod_state.call.output_norm is not None:
            ungate_output(layer.mod_state.call.output_norm)
        del layer.router
        del layer.mod_state
        layer.__class__ = layer._mod_original
    object.__delattr__(model, STATE_ATTR)
    return model
