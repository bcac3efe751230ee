"""Layer analysis: score every layer, select the ones to convert, and write the report.

A report directory holds ``report.json`` (the source of truth), ``convert.yaml`` (ModConfig
fields that ``modadapt convert -c`` reads unchanged), ``report.md`` with two PNG figures, and a
self-contained ``report.html`` (figures inlined as base64; no external resources). It is written
into a temporary sibling and renamed at the end, so a failure never leaves a half-written one.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import shlex
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ..errors import ModAdaptError
from ..output_dir import atomic_directory
from ..version import __version__
from .calibration import Batch
from .flops import model_layer_flops
from .layer_stack import find_layers
from .selection import REPORT_FILE, select_layers

METRICS = ("arank", "cosine")
FORMAT_VERSION = 1
CONFIG_FILE = "convert.yaml"
LABELS = {"arank": "ARank (mean attention-map rank)", "cosine": "cosine(input, output) of hidden states"}


def score_layers(
    model: nn.Module, batches: Iterable[Batch], metric: str, *, tol: float | None = None, progress: bool = False
) -> list[dict]:
    """Per-layer statistics of `metric` (see `layer_aranks` / `layer_cosines`)."""
    if metric == "arank":
        from .arank import layer_aranks

        return layer_aranks(model, batches, tol=tol, progress=progress)
    if metric == "cosine":
        from .cosine import layer_cosines

        return layer_cosines(model, batches, progress=progress)
    raise ModAdaptError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")


def convertible_layers(model: nn.Module, num_layers: int) -> list[int]:
    """Layers 1.. that the model's adapter accepts (all of them when no adapter handles it)."""
    from ..plugins import find_adapter

    try:
        adapter = find_adapter(model)
    except ModAdaptError:
        return list(range(1, num_layers))
    from ..convert import accepts_layer

    return [i for i in range(1, num_layers) if accepts_layer(adapter, model, i)]


def analyze(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    model_name: str,
    data: dict,
    seed: int,
    metric: str = "arank",
    rule: tuple[str, float] = ("fraction", 0.5),
    capacity: float = 0.125,
    router: str = "topk",
    tokens: int,
    output: str,
    tol: float | None = None,
    progress: bool = False,
) -> dict:
    """Score `model`'s layers on `batches`, select layers by `rule`, and return the report dict.

    Args:
        model_name: The MODEL argument (preset or directory), recorded and used in the command.
        data: ``path``, ``sha256``, ``samples``, ``seq_len`` of the calibration data, and
            ``tokenizer`` (text) or ``kind: "images"``.
        tokens: Sequence length the FLOPs are counted for.
        output: Report directory (used in the reproducing command).
        tol: ARank's absolute singular-value tolerance (None: `matrix_rank`'s default, as γ-MoD).
    """
    import torch
    import transformers

    layers = find_layers(model)
    rows = score_layers(model, batches, metric, tol=tol, progress=progress)
    lower = metric == "arank"
    selected = select_layers(
        [r["mean"] for r in rows], rule, lower_is_redundant=lower, candidates=convertible_layers(model, len(layers))
    )
    tie = selection_tie([r["mean"] for r in rows], selected, convertible_layers(model, len(layers)), metric)
    hidden = _hidden_size(model)
    flops = model_layer_flops(model, layers, hidden, tokens, capacity, selected)
    for row, f in zip(rows, flops):
        row.update(selected=row["layer"] in selected, flops_dense=f["dense"], flops_mod=f["mod"])
    config = {"router": router, "capacity": capacity, "layers": selected}
    config_path = str(Path(output) / CONFIG_FILE)
    return {
        "format": FORMAT_VERSION,
        "versions": {
            "modadapt": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model": model_name,
        "model_class": type(model).__name__,
        "num_layers": len(layers),
        "data": data,
        "seed": seed,
        "samples": data.get("samples"),
        "metric": metric,
        "tol": tol if metric == "arank" else None,
        "lower_is_redundant": lower,
        "rule": {"name": rule[0], "value": rule[1]},
        "capacity": capacity,
        "flops_tokens": tokens,
        "layers": rows,
        "selected_layers": selected,
        "tie": tie,
        "convert_config": config,
        "convert_command": shlex.join(
            ["modadapt", "convert", model_name, "-c", config_path, "-o", _default_out(model_name)]
        ),
        "convert_command_flags": shlex.join(
            [
                "modadapt",
                "convert",
                model_name,
                "--router",
                router,
                "--layers",
                f"from:{output}",
                *(["--capacity", str(capacity)] if _capacity_based(router) else []),
                "-o",
                _default_out(model_name),
            ]
        ),
    }


def selection_tie(scores: list[float], selected: list[int], candidates: list[int], metric: str) -> str | None:
    """A warning when selected and unselected layers score the same: the metric did not choose
    between them, layer order did (e.g. ARank saturating at seq_len - 1 on every layer)."""
    chosen = [i for i in candidates if i in selected]
    tied = {scores[i] for i in chosen} & {scores[i] for i in candidates if i not in selected}
    if not tied:
        return None
    value = min(tied)
    layers = [i for i in candidates if scores[i] == value]
    return (
        f"layers {layers} all score {value:.4f} ({metric}): the metric does not tell them apart, so "
        f"{[i for i in layers if i in selected]} were chosen by layer order; try another --metric "
        "(or, for arank, --tol)."
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True).hidden_size
    return int(model.embed_dim)


def _capacity_based(router: str) -> bool:
    from ..plugins import get_router

    return bool(get_router(router).obj.capacity_based)


def _default_out(model_name: str) -> str:
    return Path(model_name.rstrip("/")).name + "-mod"


# --- writing -------------------------------------------------------------------------------------
def write_report(report: dict, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the report files into `directory` atomically (temporary sibling, then rename)."""
    import yaml

    with atomic_directory(directory, REPORT_FILE, overwrite) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        header = f"# ModConfig written by `modadapt analyze` ({report['metric']}, {_rule_text(report)}).\n"
        (tmp / CONFIG_FILE).write_text(header + yaml.safe_dump(report["convert_config"], sort_keys=False))
        figures = {"metric.png": _metric_figure(report), "flops.png": _flops_figure(report)}
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report))
        (tmp / "report.html").write_text(render_html(report, figures))
    return Path(directory)


def _rule_text(report: dict) -> str:
    rule = report["rule"]
    return f"{rule['name']}={rule['value']}"


def _table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["layer", f"{report['metric']} mean", "std", "normalised", "dense GFLOPs", "MoD GFLOPs", "selected"]
    rows = []
    for r in report["layers"]:
        norm = "" if r["normalized_mean"] is None else f"{r['normalized_mean']:.4f}"
        rows.append(
            [
                str(r["layer"]),
                f"{r['mean']:.4f}",
                f"{r['std']:.4f}",
                norm,
                f"{r['flops_dense'] / 1e9:.4f}",
                f"{r['flops_mod'] / 1e9:.4f}",
                "yes" if r["selected"] else "",
            ]
        )
    return head, rows


def _summary(report: dict) -> list[str]:
    dense = sum(r["flops_dense"] for r in report["layers"])
    mod = sum(r["flops_mod"] for r in report["layers"])
    data = report["data"]
    direction = "lower" if report["lower_is_redundant"] else "higher"
    return [
        f"Model: {report['model']} ({report['model_class']}, {report['num_layers']} layers)",
        f"Data: {data['path']} (sha256 {data['sha256'][:16]}..., {_samples_text(data)}, "
        f"{'tokenizer: ' + data['tokenizer'] if 'tokenizer' in data else data.get('kind', 'text')}), "
        f"seed {report['seed']}",
        *([f"Warning: {report['tie']}"] if report.get("tie") else []),
        f"Metric: {report['metric']} ({direction} = more redundant); rule {_rule_text(report)}; "
        f"layer 0 is never selected",
        f"Selected layers: {report['selected_layers']}",
        f"Layer FLOPs at capacity {report['capacity']} ({report['flops_tokens']} tokens): "
        f"{dense / 1e9:.4f} G dense -> {mod / 1e9:.4f} G MoD ({mod / dense:.1%})",
    ]


def _samples_text(data: dict) -> str:
    text = f"{data['samples']} samples x {data['seq_len']} tokens"
    if data.get("text_tokens") is not None and data["text_tokens"] < data["samples"] * data["seq_len"]:
        text += f" overlapping, from a text of {data['text_tokens']} tokens"
    return text


def render_markdown(report: dict) -> str:
    head, rows = _table(report)
    lines = [f"# Layer analysis: {report['model']}", ""]
    lines += [f"- {line}" for line in _summary(report)]
    lines += [
        "",
        "Reproduce the selection:",
        "",
        "```bash",
        report["convert_command"],
        report["convert_command_flags"],
        "```",
        "",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "![metric per layer](metric.png)", "", "![FLOPs per layer](flops.png)", ""]
    return "\n".join(lines)


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    head, rows = _table(report)
    esc = html.escape
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in figures.items()
    )
    table = (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        + "</table>"
    )
    summary = "".join(f"<li>{esc(line)}</li>" for line in _summary(report))
    command = esc(report["convert_command"] + "\n" + report["convert_command_flags"])
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:.2em .6em;text-align:right}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Layer analysis: {esc(report["model"])}</title>'
        f"<style>{style}</style></head><body><h1>Layer analysis: {esc(report['model'])}</h1><ul>{summary}</ul>"
        f"<p>Reproduce the selection:</p><pre>{command}</pre>{table}{images}</body></html>\n"
    )


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_figure(report: dict) -> bytes:
    plt = _pyplot()
    rows = report["layers"]
    x = [r["layer"] for r in rows]
    colors = ["tab:orange" if r["selected"] else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], color=colors, capsize=3)
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:orange", label="selected"), Patch(color="tab:blue", label="not selected")]
    if report["rule"]["name"] == "threshold":
        handles.append(
            ax.axhline(
                report["rule"]["value"], color="tab:red", linestyle="--", label=f"threshold {report['rule']['value']}"
            )
        )
    ax.set_xlabel("layer")
    ax.set_ylabel(LABELS[report["metric"]])
    ax.set_xticks(x)
    ax.set_title(f"{report['model']}: {report['metric']} per layer ({_rule_text(report)})")
    ax.legend(handles=handles, loc="best", fontsize="small")
    return _png(fig)


def _flops_figure(report: dict) -> bytes:
    plt = _pyplot()
    rows = report["layers"]
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in x], [r["flops_dense"] / 1e9 for r in rows], width=0.4, label="dense")
    ax.bar(
        [i + 0.2 for i in x],
        [r["flops_mod"] / 1e9 for r in rows],
        width=0.4,
        label=f"MoD, capacity {report['capacity']}",
    )
    ax.set_xlabel("layer")
    ax.set_ylabel(f"GFLOPs per sequence of {report['flops_tokens']} tokens")
    ax.set_xticks(x)
    ax.set_title("forward FLOPs per layer")
    ax.legend(loc="best", fontsize="small")
    return _png(fig)
