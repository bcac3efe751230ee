"""Plugin registry (pluggy). Built-in routers, adapters, presets and recipes register through the
same hooks (`modadapt.hookspecs`) as third-party packages, which declare an entry point in the
group ``modadapt``::

    [project.entry-points.modadapt]
    my_router = "my_package.plugin"

and implement, in that module::

    from modadapt import hookimpl

    @hookimpl
    def register_routers(register):
        register(MyRouter)            # name taken from MyRouter.name

Environment switches: ``MODADAPT_NO_PLUGINS=1`` loads no external plugin;
``MODADAPT_PLUGINS=name1,name2`` loads only the entry points with those names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
from torch import nn

from .adapters import base as adapter_contract
from .adapters.base import Adapter
from .errors import ModAdaptError
from .hookspecs import PROJECT, HookSpecs, Preset, Recipe, hookimpl, hookspec  # noqa: F401 (re-exported)
from .routers import base as router_contract

BUILTIN_MODULES = (
    "modadapt.routers.builtin",
    "modadapt.adapters.builtin",
    "modadapt.presets",
    "modadapt.recipes.builtin",
)


def _record_violation(kind: type) -> Callable[[Any], str | None]:
    def check(obj: Any) -> str | None:
        return None if isinstance(obj, kind) else f"{obj!r} is not a modadapt.{kind.__name__}"

    return check


#: Per kind: the hook that registers it, and the check an object must pass to be registered.
KINDS: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "router": ("register_routers", router_contract.contract_violation),
    "adapter": ("register_adapters", adapter_contract.contract_violation),
    "preset": ("register_presets", _record_violation(Preset)),
    "recipe": ("register_recipes", _record_violation(Recipe)),
}


@dataclass
class Registration:
    name: str
    obj: Any
    provider: str
    kind: str

    def as_dict(self) -> dict:
        doc = getattr(self.obj, "description", "") or (self.obj.__doc__ if isinstance(self.obj, type) else "") or ""
        doc = doc.strip()
        return {
            "name": self.name,
            "provider": self.provider,
            "kind": self.kind,
            "summary": doc.splitlines()[0] if doc else "",
        }


class Registry:
    """Loaded plugins and what they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.providers: dict[int, str] = {}
        self.entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._load()

    def _load(self) -> None:
        for module_name in BUILTIN_MODULES:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
            self.providers[id(module)] = PROJECT
        if os.environ.get("MODADAPT_NO_PLUGINS", "").strip() in ("", "0"):
            self._load_entry_points()
        self.pm.check_pending()
        for kind, (hook_name, _) in KINDS.items():
            self._collect(kind, hook_name)

    def _load_entry_points(self) -> None:
        only = {n.strip() for n in os.environ.get("MODADAPT_PLUGINS", "").split(",") if n.strip()}
        for ep in metadata.entry_points(group=PROJECT):
            if (only and ep.name not in only) or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is named, not silently skipped
                raise ModAdaptError(f"plugin {ep.name!r} failed to load: {exc}") from exc
            self.pm.register(plugin, name=ep.name)
            self.providers[id(plugin)] = ep.dist.name if getattr(ep, "dist", None) is not None else ep.name

    def _collect(self, kind: str, hook_name: str) -> None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            provider = self.providers.get(id(impl.plugin), impl.plugin_name)
            impl.function(register=self._registrar(kind, provider))

    def _registrar(self, kind: str, provider: str) -> Callable[..., None]:
        def register(obj: Any, name: str | None = None) -> None:
            violation = KINDS[kind][1](obj)
            if violation is not None:
                raise ModAdaptError(f"{provider} registered a {kind} that breaks its contract: {violation}.")
            name = name or getattr(obj, "name", None)
            if not name:
                raise ModAdaptError(f"{provider} registered a {kind} without a name: {obj!r}.")
            existing = self.entries[kind].get(name)
            if existing is not None:
                raise ModAdaptError(
                    f"{kind} {name!r} is registered twice: by {existing.provider} and by {provider}. "
                    "Uninstall one, or disable plugins with MODADAPT_NO_PLUGINS=1."
                )
            self.entries[kind][name] = Registration(name, obj, provider, kind)

        return register

    def get(self, kind: str, name: str) -> Registration:
        entry = self.entries[kind].get(name)
        if entry is None:
            known = ", ".join(f"{e.name} ({e.provider})" for e in self.entries[kind].values()) or "none"
            raise ModAdaptError(f"unknown {kind} {name!r}; installed {kind}s: {known}.")
        return entry

    def list(self, kind: str) -> list[Registration]:
        return sorted(self.entries[kind].values(), key=lambda e: e.name)

    def plugins(self) -> list[dict]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            out.append({"name": name, "provider": self.providers.get(id(plugin), name), "hooks": hooks})
        return sorted(out, key=lambda p: p["name"])


_REGISTRY: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
    return _REGISTRY


def get_router(name: str) -> Registration:
    return registry().get("router", name)


def get_adapter(name: str) -> Registration:
    return registry().get("adapter", name)


def find_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter that handles `model`: the one named, else the only registered one that claims
    it. Two claimants are an error naming both: a plugin must never shadow another silently."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    if name is not None:
        adapter = get_adapter(name).obj()
        if not adapter.matches(model):
            raise ModAdaptError(f"adapter {name!r} does not handle {what}.")
        return adapter
    entries = registry().list("adapter")
    claims = []
    for entry in entries:
        adapter = entry.obj()
        if adapter.matches(model):
            claims.append((entry, adapter))
    if len(claims) == 1:
        return claims[0][1]
    if claims:
        named = " and ".join(f"{e.name!r} ({e.provider})" for e, _ in claims)
        raise ModAdaptError(
            f"{what} is claimed by several adapters: {named}. Choose one with modadapt.convert(model, "
            f"adapter={claims[0][0].name!r}) (CLI: --adapter), or uninstall one of them."
        )
    installed = "; ".join(f"{e.name}: {e.obj.description or e.provider}" for e in entries)
    raise ModAdaptError(
        f"unsupported model {what}: no installed adapter handles it. Installed adapters: {installed}. "
        "A plugin can register an adapter for it."
    )


def get_preset(name: str) -> Registration:
    return registry().get("preset", name)


def get_recipe(name: str) -> Registration:
    return registry().get("recipe", name)
