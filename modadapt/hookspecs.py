"""The plugin contract: every hook a plugin may implement, and the records that presets and
recipes register as (see docs/plugins/hooks.md).

Each hook receives one `register` callback and calls it once per thing it provides. The built-in
routers, adapters, presets and recipes register through these same hooks, so a plugin is never a
second-class citizen. Names are global per kind: registering a taken name is an error that names
both providers.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .adapters.base import Adapter
    from .routers.base import Router

PROJECT = "modadapt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Preset:
    """A tiny model with random weights, built offline (`modadapt.build_preset(name)`).

    Attributes:
        name: The preset name (also a MODEL on the command line).
        build: Returns the dense model; `build_preset` seeds the RNG around the call.
        description: One line for `modadapt list presets`.
    """

    name: str
    build: Callable[[], nn.Module]
    description: str = ""


@dataclass(frozen=True)
class Recipe:
    """A training recipe, run as ``modadapt train NAME``.

    `module` is the import path of a module with ``add_arguments(parser)`` and ``main(args) -> int``
    whose docstring is the subcommand's help. It is imported on first use only: the registry
    loads on every conversion, and recipes pull in heavy dependencies.
    """

    name: str
    module: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def description(self) -> str:
        return (self.load().__doc__ or "").strip()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        self.load().add_arguments(parser)

    def main(self, args: argparse.Namespace) -> int:
        return self.load().main(args)


class RegisterRouter(Protocol):
    def __call__(self, cls: type[Router], name: str | None = None) -> None: ...


class RegisterAdapter(Protocol):
    def __call__(self, cls: type[Adapter], name: str | None = None) -> None: ...


class RegisterPreset(Protocol):
    def __call__(self, preset: Preset, name: str | None = None) -> None: ...


class RegisterRecipe(Protocol):
    def __call__(self, recipe: Recipe, name: str | None = None) -> None: ...


class HookSpecs:
    """Every hook a plugin may implement; each receives a `register` callback."""

    @hookspec
    def register_routers(self, register: RegisterRouter) -> None:
        """Register `modadapt.Router` subclasses: ``register(cls, name=None)`` (name: `cls.name`).
        A class that breaks the Router contract is refused with the reason."""

    @hookspec
    def register_adapters(self, register: RegisterAdapter) -> None:
        """Register `modadapt.adapters.Adapter` subclasses: ``register(cls, name=None)``. Two
        adapters that both claim a model make converting it an error that names both."""

    @hookspec
    def register_presets(self, register: RegisterPreset) -> None:
        """Register tiny, offline model builders: ``register(Preset(name, build))``; they become
        `modadapt.build_preset(name)` and a MODEL name on the command line."""

    @hookspec
    def register_recipes(self, register: RegisterRecipe) -> None:
        """Register training recipes: ``register(Recipe(name, module))``, the subcommand
        ``modadapt train NAME`` (the module provides ``add_arguments(parser)`` and ``main(args)``)."""
