"""Old import paths of moved names: they keep working for one release, with a DeprecationWarning
that names the new path, so that code written against the previous layout can move at its pace.

The new home is imported by name on first use of an old name, never when the old module loads:
an old path must not tie a low-level module back to the high-level one its name moved to."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_names(module: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` serving each old name of `moves` from its new home
    (``"package.module:name"``) with a DeprecationWarning; other names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        target = moves.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, _, new_name = target.partition(":")
        warnings.warn(
            f"{module}.{name} moved to {new_module}.{new_name}; the old name goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
