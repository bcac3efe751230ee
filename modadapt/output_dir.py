"""Writing an output directory all at once: never a half-written one, never a silent overwrite."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ModAdaptError


def check_output(target: str | os.PathLike, overwrite: bool, marker: str) -> Path:
    """Refuse an output that exists and is not an empty directory, unless `overwrite` and it holds
    `marker` (the file modadapt writes there): a directory modadapt did not write is never replaced."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ModAdaptError(f"{target} exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ModAdaptError(f"{target} exists and is not empty; choose a new -o or pass --overwrite.")
        if not (target / marker).is_file():
            raise ModAdaptError(
                f"{target} was not written by modadapt (it has no {marker}); --overwrite replaces "
                "only modadapt's own output, so choose a new -o or empty it."
            )
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill (`marker` among its files); it becomes
    `target` only if the block succeeds (replacing an existing one that holds `marker` when
    `overwrite`), and is removed if it fails."""
    target = check_output(target, overwrite, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary sibling: a reader sees the old file or the new one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(tmp, path)
