"""A small real result: A-MoD `attention` routing vs the `topk` and `random` controls on digits.

scikit-learn's digits (1,797 real 8x8 handwritten digits) are cut into 2x2 patches (16 patch
tokens + a class token). Per seed: train a small dense timm ViT, convert layers
1 and 3 (every other) at capacity 0.5 with each router, fine-tune each for the same number of
steps, and measure test accuracy, FLOPs per image (flop counter + explicit attention formula) and
the kept fraction. CPU only, a few minutes::

    python benchmarks/vit_digits.py            # writes benchmarks/results/vit_digits.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modadapt
from modadapt.adapters.timm import create_model
from modadapt.metrics.measured_flops import measured_flops

ROUTERS = ("attention", "topk", "random")


def load_digits_tensors(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.33, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model, x, y, *, epochs: int, lr: float, seed: int, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y) + batch - 1) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch):
            b = order[i : i + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            aux = modadapt.aux_loss(model) if _converted(model) else None
            if aux is not None:
                loss = loss + aux
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def _converted(model) -> bool:
    from modadapt.mod_layer import state_of

    return state_of(model) is not None


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, dict]:
    model.eval()
    correct, kept = 0, {}
    for i in range(0, len(y), 256):
        correct += int((model(x[i : i + 256]).argmax(-1) == y[i : i + 256]).sum())
        if _converted(model):
            for row in modadapt.routing_stats(model):
                kept.setdefault(row["layer"], []).append(row["kept_fraction"])
    return correct / len(y), {k: statistics.mean(v) for k, v in kept.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--capacity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vit_digits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    runs = []
    for seed in range(args.seeds):
        x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
        torch.manual_seed(seed)
        dense = create_model(
            "vit_tiny_patch16_224",
            img_size=8,
            patch_size=2,
            in_chans=1,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
            num_classes=10,
        )
        train(dense, x_tr, y_tr, epochs=args.dense_epochs, lr=1e-3, seed=seed)
        dense_acc, _ = evaluate(dense, x_te, y_te)
        dense_flops = measured_flops(dense, x_te[:1])["total"]
        row = {"seed": seed, "dense": {"accuracy": dense_acc, "flops": dense_flops}}
        # The dense model fine-tuned for the same budget: is any MoD loss just under-training?
        dense_ft = copy.deepcopy(dense)
        train(dense_ft, x_tr, y_tr, epochs=args.finetune_epochs, lr=3e-4, seed=seed + 100)
        row["dense+ft"] = {"accuracy": evaluate(dense_ft, x_te, y_te)[0], "flops": dense_flops}
        for router in ROUTERS:
            model = copy.deepcopy(dense)
            modadapt.convert(model, router=router, capacity=args.capacity, layers="every-other")
            before, _ = evaluate(model, x_te, y_te)
            torch.manual_seed(seed + 100)
            train(model, x_tr, y_tr, epochs=args.finetune_epochs, lr=3e-4, seed=seed + 100)
            after, kept = evaluate(model, x_te, y_te)
            flops = measured_flops(model, x_te[:1])
            row[router] = {
                "accuracy_before_ft": before,
                "accuracy": after,
                "flops": flops["total"],
                "router_flops": flops["router"],
                "kept_fraction": kept,
            }
        runs.append(row)
        print(json.dumps(row), flush=True)
    import platform

    import timm

    result = {
        "config": vars(args),
        "seconds": round(time.time() - started, 1),
        "runs": runs,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {args.threads} threads, timm {timm.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    runs = result["runs"]
    cfg = result["config"]

    def stat(name, key):
        vals = [r[name][key] for r in runs]
        mean = statistics.mean(vals)
        return f"{100 * mean:.2f} ± {100 * statistics.pstdev(vals):.2f}" if len(vals) > 1 else f"{100 * mean:.2f}"

    dense_flops = runs[0]["dense"]["flops"]
    lines = [
        "# ViT on scikit-learn digits: attention routing (A-MoD) vs controls",
        "",
        f"Generated by `python benchmarks/vit_digits.py` ({len(runs)} seeds, {result['seconds']} s on CPU, "
        f"torch {result['torch']}). 8x8 digits, 2x2 patches (16 patch tokens + class token); "
        f"ViT with 4 blocks, width 64, 4 heads. Dense: {cfg['dense_epochs']} epochs. MoD: layers 1 and 3, "
        f"capacity {cfg['capacity']}, each fine-tuned {cfg['finetune_epochs']} epochs (same steps, lr, data order). "
        "Accuracy on the 33% held-out test split, mean ± std over seeds (each seed: its own split, dense model "
        "and fine-tune). FLOPs per image: torch flop counter + explicit attention formula, router cost included.",
        "",
        "| model | test acc. before fine-tune (%) | test acc. (%) | FLOPs / image | vs dense | kept fraction (layers 1, 3) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| dense | – | {stat('dense', 'accuracy')} | {dense_flops / 1e6:.2f} M | 1.000 | 1.0, 1.0 |",
        f"| dense + same fine-tune | – | {stat('dense+ft', 'accuracy')} | {dense_flops / 1e6:.2f} M | 1.000 | 1.0, 1.0 |",
    ]
    for router in ROUTERS:
        r0 = runs[0][router]
        kept = ", ".join(f"{v:.3f}" for v in r0["kept_fraction"].values())
        lines.append(
            f"| MoD `{router}` | {stat(router, 'accuracy_before_ft')} | {stat(router, 'accuracy')} | "
            f"{r0['flops'] / 1e6:.2f} M | {r0['flops'] / dense_flops:.3f} | {kept} |"
        )
    means = {r: statistics.mean(x[r]["accuracy"] for x in runs) for r in ROUTERS}
    wins = {r: sum(x["attention"]["accuracy"] > x[r]["accuracy"] for x in runs) for r in ("topk", "random")}
    lines += [
        "",
        f"`attention` router cost: {runs[0]['attention']['router_flops'] / 1e6:.3f} M FLOPs per image "
        "(recomputing the preceding layer's map from q and k) — included above.",
        "",
        "**Does attention routing beat the controls here?** "
        + ("Yes" if means["attention"] > max(means["topk"], means["random"]) else "No")
        + f": mean accuracy attention {100 * means['attention']:.2f}%, topk {100 * means['topk']:.2f}%, "
        f"random {100 * means['random']:.2f}%; attention is better than topk in {wins['topk']}/{len(runs)} seeds "
        f"and than random in {wins['random']}/{len(runs)} seeds. The gap to the best control "
        f"({100 * (means['attention'] - max(means['topk'], means['random'])):+.2f} points) is about one "
        "seed-to-seed standard deviation: suggestive on this tiny dataset, not conclusive. At this fine-tune "
        "budget no router recovers the dense accuracy, and `attention` pays its router FLOPs on top.",
        "",
        f"Run on: {result.get('machine', 'CPU')}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
