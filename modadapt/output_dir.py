"""Writing an output directory all at once: never a half-written one, never a silent overwrite."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ModAdaptError


def check_output(target: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists and is not an empty directory, unless `overwrite`."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ModAdaptError(f"{target} exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ModAdaptError(f"{target} exists and is not empty; choose a new -o or pass --overwrite.")
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; it becomes `target` only if the block
    succeeds (replacing an existing one when `overwrite`), and is removed if it fails."""
    target = check_output(target, overwrite)
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
