"""What every recipe's configuration shares: a dataclass whose fields are YAML keys and flags.

A recipe config subclasses `RecipeConfig` (and is a dataclass with `help` metadata on each
field); `RecipeConfig.resolve` merges a YAML file with command-line overrides (flags win) and
rejects unknown keys; `add_config_arguments` gives one flag per field.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

from ..errors import ModAdaptError


class RecipeConfig:
    """Mixin for recipe config dataclasses; `recipe` names the recipe in error messages."""

    recipe: ClassVar[str] = "recipe"

    @classmethod
    def resolve(cls, file: str | None, overrides: dict):
        """The config from YAML `file` (optional) with the non-None `overrides` on top."""
        values: dict = {}
        if file:
            import yaml

            path = Path(file)
            if not path.is_file():
                raise ModAdaptError(f"config file {file} does not exist.")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ModAdaptError(f"config file {file} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise ModAdaptError(f"config file {file} must hold a mapping of {cls.recipe} fields.")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModAdaptError(f"unknown {cls.recipe} fields {unknown}; known: {sorted(known)}.")
        return cls(**values)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """`-c FILE` plus one flag per config field; flags left out keep the YAML/default value."""
    parser.add_argument("-c", "--config", help="YAML file of recipe fields; flags override it")
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "-o"] if f.name == "output" else [flag]
        if f.type in ("bool", bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"])
        elif f.type in ("dict", dict):
            parser.add_argument(*names, dest=f.name, type=json_dict, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(*names, dest=f.name, type=kind, default=None, help=f.metadata["help"])


def overrides_from(args: argparse.Namespace, config_cls: type) -> dict:
    """The config fields as given on the command line (None where a flag was left out)."""
    return {f.name: getattr(args, f.name) for f in fields(config_cls)}


def json_dict(text: str) -> dict:
    """argparse type for a JSON object flag (e.g. `--router-kwargs '{"p": 0.6}'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
