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
from typing import Any, ClassVar

from ..errors import ModAdaptError


class RecipeConfig:
    """Mixin for recipe config dataclasses; `recipe` names the recipe in error messages and
    `resumable` the fields a resumed run may change (the rest would make a different run)."""

    recipe: ClassVar[str] = "recipe"
    resumable: ClassVar[frozenset[str]] = frozenset(
        {"output", "resume", "max_steps", "save_every", "progress", "eval_batch_size"}
    )

    @classmethod
    def resolve(cls, file: str | None, overrides: dict):
        """The config from YAML `file` (optional) with the non-None `overrides` on top; with
        ``resume``, on top of the run directory's saved ``config.yaml``."""
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
        if values.get("resume"):
            values = {**read_run_config(values.get("output", ""), cls), **values}
        return cls(**values)


def read_run_config(output: str, config_cls: type) -> dict[str, Any]:
    """The fields a run saved in ``OUTPUT/config.yaml``: what a resumed run starts from."""
    import yaml

    if not output:
        raise ModAdaptError(f"{config_cls.recipe}: --resume needs the run directory (-o DIR).")
    path = Path(output) / "config.yaml"
    if not path.is_file():
        raise ModAdaptError(
            f"resume: {output} has no checkpoint or config.yaml to resume from; start the run without --resume."
        )
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise ModAdaptError(f"resume: {path} is corrupt; it is not the YAML mapping a run writes.")
    unknown = sorted(set(saved) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ModAdaptError(f"resume: {output} is not a {config_cls.recipe} run ({path} has fields {unknown}).")
    return saved


def run_setting(run_dir: Path, name: str) -> int | None:
    """The integer setting `name` a recipe run in `run_dir` used (its ``config.yaml``), or None
    when `run_dir` is not a run that has it: what ``modadapt eval`` matches by default."""
    import yaml

    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    value = saved.get(name) if isinstance(saved, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_resumable(cfg: RecipeConfig, saved: dict[str, Any]) -> None:
    """Refuse a resume whose configuration differs from the run's saved one in a field that
    would make it a different run (any but `cfg.resumable`)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in cfg.resumable and f.name in saved and saved[f.name] != value:
            changeable = ", ".join(sorted(cfg.resumable - {"output", "resume"}))
            raise ModAdaptError(
                f"resume: {f.name} is {saved[f.name]!r} in {Path(cfg.output) / 'config.yaml'}, not {value!r}; "
                f"a resumed run keeps its configuration except {changeable} (start a new run to change {f.name})."
            )


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """`-c FILE` plus one flag per config field; flags left out keep the YAML/default value."""
    parser.add_argument("-c", "--config", help="YAML file of recipe fields; flags override it")
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "-o"] if f.name == "output" else [flag]
        if f.type in ("bool", bool):
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
            )
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
