"""Typed router options: one frozen dataclass per router, each field with its type, default, help
text and constraints, so that parsing `router_kwargs`, validating them, `modadapt list routers`
and the docs all read one declaration instead of a dict of defaults whose types are guessed.

    @dataclass(frozen=True)
    class MyOptions(RouterOptions):
        bias: float = option(0.0, "added to every score")
        width: int = option(64, "hidden units of the predictor", low=1)
        rule: str = option("aux", "how the causal rule is taught", choices=("aux", "predictor"))
        cutoff: float | None = option(None, "causal cut-off; calibrated: learnt in training",
                                      none="calibrated", calibrated=0.0)

Values arrive from Python, YAML or ``--router-arg KEY=VALUE`` and are converted to the field's
type (``"0.5"`` -> 0.5, ``"true"`` -> True, ``2.0`` -> 2); ``T | None`` fields also take their
`none` spelling (``none``, or ``calibrated`` for learnt cut-offs).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ModAdaptError

#: Spellings of None accepted for a `T | None` option besides its own label.
_NONE_WORDS = ("none", "calibrated", "")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    open_interval: bool = False,
    none: str = "none",
    calibrated: float | None = None,
) -> Any:
    """A router option: its default, one line of help and its constraints.

    Args:
        default: The value when the user gives none.
        help: What the option does (shown by `modadapt list routers`).
        choices: The only values allowed.
        low, high: Bounds (inclusive; exclusive with `open_interval`).
        none: How None is spelt for a `T | None` option (``none``, or ``calibrated``).
        calibrated: Marks the option that fixes a learnt causal cut-off (None: learn it, see
            `Router.causal_threshold`); the value is the cut-off used before any training step.
    """
    meta = dict(
        help=help, choices=choices, low=low, high=high, open_interval=open_interval, none=none, calibrated=calibrated
    )
    return dataclasses.field(default=default, metadata=meta)


def _type_of(cls: type, name: str) -> tuple[type, bool]:
    """The field's value type and whether it also takes None (from `T | None`)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _convert(router: str, name: str, value: Any, kind: type, nullable: bool, none: str, default: Any) -> Any:
    """`value` as a `kind` (or None), or a clear error naming the argument."""
    if nullable and (value is None or (isinstance(value, str) and value.lower() in (*_NONE_WORDS, none))):
        return None
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    try:
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if kind is int and not isinstance(value, bool):
            number = float(value)
            if number.is_integer():
                return int(number)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError):
        pass
    if nullable:
        spelt = "none" if none == "none" else f"none / {none}"
        raise ModAdaptError(f"router {router!r}: argument {name!r} must be a number, or {spelt}, got {value!r}.")
    raise ModAdaptError(
        f"router {router!r}: argument {name!r} must be a {kind.__name__} (like its default {default!r}), got {value!r}."
    )


def _constraint(meta: dict) -> str | None:
    """The constraint in words: ``in (0, 1)``, ``>= 0``, ``'aux' or 'predictor'``."""
    if meta["choices"]:
        quoted = [repr(c) for c in meta["choices"]]
        return " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
    low, high, strict = meta["low"], meta["high"], meta["open_interval"]
    if low is not None and high is not None:
        return f"in {'(' if strict else '['}{low:g}, {high:g}{')' if strict else ']'}"
    if low is not None:
        return f"{'>' if strict else '>='} {low:g}"
    if high is not None:
        return f"{'<' if strict else '<='} {high:g}"
    return None


def _allowed(value: Any, meta: dict) -> bool:
    if meta["choices"]:
        return value in meta["choices"]
    low, high, strict = meta["low"], meta["high"], meta["open_interval"]
    if low is not None and (value <= low if strict else value < low):
        return False
    return not (high is not None and (value >= high if strict else value > high))


@dataclass(frozen=True)
class RouterOptions:
    """The options of a router: subclass it (a frozen dataclass of `option` fields) and name it
    as the router's `Options`. Item access (``options["p"]``) reads a field too. The helpers
    below are functions, not methods, so that no option name can shadow them."""

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


def parse_options(cls: type[RouterOptions], router: str, kwargs: dict[str, Any]) -> RouterOptions:
    """`cls` from user `kwargs` (converted and validated), or a clear error naming the argument,
    what it must be, and the router's arguments."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ModAdaptError(f"router {router!r} has no argument {unknown[0]!r}; its arguments are: {names}.")
    values = {}
    for name, value in kwargs.items():
        meta = known[name].metadata
        kind, nullable = _type_of(cls, name)
        value = _convert(router, name, value, kind, nullable, meta.get("none", "none"), known[name].default)
        if value is not None and meta and not _allowed(value, meta):
            also = f" or {meta['none']!r}" if nullable else ""
            raise ModAdaptError(f"{router}: {name} must be {_constraint(meta)}{also}, got {value!r}.")
        values[name] = value
    return cls(**values)


def option_defaults(cls: type[RouterOptions]) -> dict[str, Any]:
    """Each option's default, None spelt as its label (``calibrated``, ``none``)."""
    return {f.name: f.default if f.default is not None else f.metadata.get("none", "none") for f in fields(cls)}


def describe_options(cls: type[RouterOptions]) -> list[dict[str, Any]]:
    """Name, type, default, help and constraint of each option (for `modadapt list routers`)."""
    out = []
    for f in fields(cls):
        kind, nullable = _type_of(cls, f.name)
        meta = f.metadata
        out.append(
            {
                "name": f.name,
                "type": kind.__name__ + (f" | {meta.get('none', 'none')}" if nullable else ""),
                "default": f.default if f.default is not None else meta.get("none", "none"),
                "help": meta.get("help", ""),
                "allowed": _constraint(meta) if meta else None,
            }
        )
    return out


def calibrated_option(cls: type[RouterOptions]) -> tuple[str, float] | None:
    """The option that fixes a learnt causal cut-off and the cut-off before training, if any."""
    for f in fields(cls):
        if f.metadata.get("calibrated") is not None:
            return f.name, f.metadata["calibrated"]
    return None


def legacy_options(router: type) -> type[RouterOptions]:
    """The `RouterOptions` of a router declared the old way (`arguments` dict of defaults,
    `nullable` names, `causal_cutoff` tuple): types from the defaults, None for nullable ones."""
    arguments = dict(getattr(router, "arguments", {}) or {})
    nullable = set(getattr(router, "nullable", ()) or ())
    cutoff = getattr(router, "causal_cutoff", None)
    specs = []
    for name, default in arguments.items():
        if cutoff and name == cutoff[0]:
            spec = (float | None, option(default, "", none="calibrated", calibrated=cutoff[1]))
        elif name in nullable:
            spec = (float | None, option(default, ""))
        else:
            spec = (object if default is None else type(default), option(default, ""))
        specs.append((name, *spec))
    return dataclasses.make_dataclass(f"{router.__name__}Options", specs, bases=(RouterOptions,), frozen=True)
