"""The `vit-imagenet` recipe end to end on a tiny generated imagefolder (CPU), resume, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import modadapt
from modadapt.cli import main
from modadapt.errors import ModAdaptError
from modadapt.recipes.vit_imagenet import ViTRecipeConfig, load_splits, pick_split, run


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("validation", 2)):
        for label in ("cat", "dog", "eel"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):  # odd sizes and grayscale: the transforms resize and convert
                shape = (20 + i, 27, 3) if i % 2 else (30, 18)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


def config(data, out, **extra):
    base = dict(
        data=str(data),
        output=str(out),
        batch_size=4,
        eval_batch_size=8,
        max_steps=4,
        epochs=2,
        augment=False,
        progress=False,
        cpu=True,
        lr=1e-3,
    )
    return ViTRecipeConfig(**{**base, **extra})


def test_end_to_end_with_resume(imagefolder, tmp_path, monkeypatch, interrupt_at_step, capsys):
    straight = run(config(imagefolder, tmp_path / "a"))
    # The same run, killed in its 3rd optimizer step (mid-epoch: 3 steps per epoch), then resumed.
    interrupt_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        run(config(imagefolder, tmp_path / "b", save_every=1))
    monkeypatch.undo()
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["bad_steps"], len(state["history"]["loss"])) == (2, 0, 2)  # the loop every recipe runs
    code = main(["train", "vit-imagenet", "-o", str(tmp_path / "b"), "--resume", "--save-every", "0"])
    assert code == 0
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert resumed["steps"] == straight["steps"] == 4
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    a, b = modadapt.load(tmp_path / "a" / "model"), modadapt.load(tmp_path / "b" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)

    ev = straight["eval"]
    assert ev["images"] == 6 and 0.0 <= ev["top1"] <= ev["top5"] <= 1.0
    # `modadapt eval` of the run gives the run's own evaluation.
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "a"), "--data", str(imagefolder), "--json", "--quiet", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["top1"], again["top5"], again["images"], again["split"]) == (ev["top1"], ev["top5"], 6, "validation")
    assert again["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    assert main(["eval", str(tmp_path / "a"), "--data", str(imagefolder), "--quiet", "--dense"]) == 0
    assert capsys.readouterr().out.startswith("dense top-1 ")
    assert set(ev["kept_fraction"]) == {"1", "3"} and all(0 < f < 1 for f in ev["kept_fraction"].values())
    assert straight["flops_ratio"] < 1.0 and straight["flops_per_image"]["mod"]["router"] > 0
    resolved = (tmp_path / "b" / "config.yaml").read_text()
    assert "resume: true" in resolved and "router: attention" in resolved


def test_augmented_runs_repeat_for_a_seed(imagefolder, tmp_path):
    """timm's training augmentation draws from Python's `random`: a fixed seed repeats the run."""
    import random

    first = run(config(imagefolder, tmp_path / "a", augment=True, seed=3))
    random.seed(12345)  # whatever state a previous caller left behind
    torch.manual_seed(12345)
    again = run(config(imagefolder, tmp_path / "b", augment=True, seed=3))
    assert again["final_train_loss"] == first["final_train_loss"]
    other = run(config(imagefolder, tmp_path / "c", augment=True, seed=4))
    assert other["final_train_loss"] != first["final_train_loss"]


def test_yaml_defaults_and_flag_overrides(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("data: /x\noutput: /y\ncapacity: 0.25\nrouter: topk\n")
    cfg = ViTRecipeConfig.resolve(str(file), {"capacity": 0.75, "router": None})
    assert (cfg.capacity, cfg.router, cfg.data) == (0.75, "topk", "/x")
    file.write_text("data: /x\noutput: /y\ncapasity: 0.25\n")
    with pytest.raises(ModAdaptError, match="capasity"):
        ViTRecipeConfig.resolve(str(file), {})


def test_bad_data_paths(tmp_path, capsys):
    code = main(["train", "vit-imagenet", "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModAdaptError, match="holds no images"):
        load_splits(str(tmp_path / "empty"))
    assert not (tmp_path / "o").exists()


def test_wrong_image_size(imagefolder, tmp_path):
    with pytest.raises(ModAdaptError, match="takes 32x32 images"):
        run(config(imagefolder, tmp_path / "o", image_size=48))
    with pytest.raises(ModAdaptError, match="no 'validation' split"):
        run(config(imagefolder / "train", tmp_path / "o2"))


def test_parquet_in_hf_imagenet_layout(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    splits = load_splits(str(tmp_path))
    assert len(pick_split(splits, "validation", str(tmp_path))) == 4
    (tmp_path / "data" / "extra-0.parquet").write_bytes(b"")
    with pytest.raises(ModAdaptError, match="cannot tell its split"):
        load_splits(str(tmp_path))


def test_a_local_imagefolder_loads_without_a_download_bar(tmp_path, capfd):
    """datasets "downloads" local files behind a "Downloading data" bar (from 16 files on); the
    recipe turns that bar off, keeps the real work's progress, and still surfaces datasets' errors."""
    rng = np.random.default_rng(1)
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / "many" / split / label).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "many" / split / label / f"{i}.png"
                )
    capfd.readouterr()
    splits = load_splits(str(tmp_path / "many"))
    err = capfd.readouterr().err
    assert {name: len(part) for name, part in splits.items()} == {"train": 20, "validation": 20}
    assert "Downloading" not in err and "Generating train split" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception, match="(?i)parquet"):
        load_splits(str(tmp_path / "bad"))
