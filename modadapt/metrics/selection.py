"""Layer selection from per-layer redundancy scores, and reading a selection back from a report.

Rules (never layer 0): ``fraction=F`` takes the most redundant ceil(F·(L−1)) candidate layers,
``count=K`` the K most redundant, ``threshold=X`` every layer with ARank below X (for the cosine
metric: similarity above X). For ARank lower is more redundant; for cosine, higher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModAdaptError

RULES = ("fraction", "count", "threshold")
REPORT_FILE = "report.json"


def parse_rule(text: str) -> tuple[str, float]:
    """`'fraction=0.5'` -> `('fraction', 0.5)`, with the value range-checked."""
    name, sep, raw = str(text).partition("=")
    name = name.strip()
    if not sep or name not in RULES:
        raise ModAdaptError(f"--select expects fraction=F, count=K or threshold=X, got {text!r}.")
    try:
        value = float(raw)
    except ValueError:
        raise ModAdaptError(f"--select {name}= needs a number, got {raw!r}.") from None
    if not math.isfinite(value):
        raise ModAdaptError(f"--select {name}= needs a finite number, got {raw!r}.")
    if name == "fraction" and not 0.0 < value <= 1.0:
        raise ModAdaptError(f"--select fraction must be in (0, 1], got {value}.")
    if name == "count":
        if value != int(value) or value < 1:
            raise ModAdaptError(f"--select count must be a whole number >= 1, got {raw!r}.")
        value = int(value)
    return name, value


def select_layers(
    scores: list[float], rule: tuple[str, float], *, lower_is_redundant: bool, candidates: list[int] | None = None
) -> list[int]:
    """Sorted layer indices chosen by `rule` among `candidates` (default: every layer but 0).

    Ties are broken towards the earlier layer, so a selection is deterministic.
    """
    candidates = [i for i in (candidates if candidates is not None else range(len(scores))) if i != 0]
    if not candidates:
        raise ModAdaptError(f"a {len(scores)}-layer model has no layer that may be converted (layer 0 never is).")
    sign = 1.0 if lower_is_redundant else -1.0
    ranked = sorted(candidates, key=lambda i: (sign * scores[i], i))
    name, value = rule
    if name == "fraction":
        chosen = ranked[: max(1, math.ceil(value * len(candidates)))]
    elif name == "count":
        if value > len(candidates):
            raise ModAdaptError(
                f"--select count={value} asks for more layers than the {len(candidates)} that may be converted."
            )
        chosen = ranked[:value]
    else:
        chosen = [i for i in candidates if sign * scores[i] < sign * value]
        if not chosen:
            side = "below" if lower_is_redundant else "above"
            raise ModAdaptError(f"no layer scores {side} the threshold {value}; see the scores and choose another.")
    return sorted(chosen)


def read_selection(directory: str | Path) -> tuple[list[int], int]:
    """`(selected layers, number of layers of the analysed model)` from a report directory."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        raise ModAdaptError(f"--layers from:{directory}: {path} does not exist; run `modadapt analyze` first.")
    try:
        report = json.loads(path.read_text())
        layers, num_layers = report["selected_layers"], report["num_layers"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModAdaptError(f"{path} is corrupt: it is not a report written by `modadapt analyze`.") from None
    valid = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(layers, list) and layers and all(valid(i) for i in layers) and valid(num_layers)):
        raise ModAdaptError(f"{path} is corrupt: 'selected_layers' / 'num_layers' are not layer indices.")
    return sorted(layers), num_layers
