"""A recipe's run directory: `--resume` restores the run's own configuration, a failed resume
changes nothing, SIGINT / SIGTERM stop at a step boundary with a checkpoint, and a resumed run
equals an uninterrupted one bit for bit (CPU, tiny presets)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT

import modadapt
from modadapt.cli import main
from modadapt.recipes import lm_adapt

ROOT = Path(__file__).resolve().parent.parent
TEXT = SAMPLE_TEXT


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TEXT)
    return path


def lm_flags(text, out, steps=4, *extra):
    return [
        "train",
        "lm-adapt",
        "--data",
        str(text),
        "-o",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--lr",
        "1e-2",
        "--no-progress",
        "--cpu",
        "--router",
        "topk",
        "--capacity",
        "0.5",
        "--max-train-blocks",
        "24",
        *extra,
    ]


@pytest.fixture(scope="module")
def straight(text, tmp_path_factory):
    """The uninterrupted 4-step run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(lm_flags(text, out)) == 0
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["history"] == sb["history"] and sa["valid_ppl"] == sb["valid_ppl"] and sa["steps"] == sb["steps"]
    ma, mb = (modadapt.load(d / "model").state_dict() for d in (a, b))
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name


def one_error_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modadapt: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- resume ---------------------------------------------------------------------------------------
def test_resume_restores_the_runs_configuration(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_flags(text, out, 2, "--save-every", "1")) == 0
    capsys.readouterr()
    # Neither --data nor --router topk again: both come from the run's config.yaml.
    assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--max-steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["mod_config"]["router"] == "topk"
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["router"], saved["max_steps"], saved["resume"], saved["data"]) == ("topk", 4, True, str(text))


@pytest.mark.parametrize(
    "flag, value", [("--router", "threshold-p"), ("--model", "tiny-gpt2"), ("--seq-len", "16"), ("--lr", "0.5")]
)
def test_resume_that_changes_the_run_is_one_line_and_changes_nothing(text, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main(lm_flags(text, out, 2)) == 0
    capsys.readouterr()
    before = files(out)
    assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--max-steps", "4", flag, value]) == 2
    one_error_line(capsys, f"resume: {flag[2:].replace('-', '_')} is ", "start a new run")
    assert files(out) == before


def test_resume_of_a_truncated_checkpoint_is_one_line_and_changes_nothing(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_flags(text, out, 2)) == 0
    weights = out / "checkpoint" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    before = files(out)
    assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--max-steps", "4"]) == 2
    one_error_line(capsys, "cannot load the checkpoint", "truncated, corrupt")
    assert files(out) == before


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["train", "lm-adapt", "-o", str(tmp_path / "none"), "--resume"]) == 2
    one_error_line(capsys, "no checkpoint or config.yaml")
    assert main(["train", "vit-imagenet", "--resume"]) == 2
    one_error_line(capsys, "needs the run directory")
    assert not (tmp_path / "none").exists()


def test_a_fresh_run_that_crashes_before_its_first_checkpoint_leaves_nothing(text, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a library failed")

    monkeypatch.setattr(lm_adapt, "load_blocks", broken)
    with pytest.raises(RuntimeError):
        main(lm_flags(text, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


# --- SIGINT / SIGTERM -----------------------------------------------------------------------------
def signal_at_step(monkeypatch, n: int, signum=signal.SIGINT) -> None:
    """The n-th optimizer step receives `signum` (the handler runs inside the step)."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize(
    "save_every, at, signum, stopped_at",
    [
        (0, 2, signal.SIGINT, 2),  # no checkpoint yet: the stop writes one
        (2, 3, signal.SIGTERM, 3),  # after the first checkpoint
    ],
)
def test_signal_stops_at_a_step_boundary_and_resume_equals_the_straight_run(
    text, straight, tmp_path, capsys, monkeypatch, save_every, at, signum, stopped_at
):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, at, signum)
    assert main(lm_flags(text, out, 4, "--save-every", str(save_every))) == 130
    monkeypatch.undo()
    one_error_line(capsys, f"checkpoint at step {stopped_at}", f"-o {out} --resume")
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == stopped_at
    assert not (out / "model").exists()
    assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--save-every", "0"]) == 0
    assert_same_run(straight, out)


def test_signal_before_the_first_step_leaves_a_run_that_resume_starts_afresh(
    text, straight, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real = lm_adapt.evaluate

    def evaluate(*args, **kwargs):  # interrupted in the evaluation before training
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_adapt, "evaluate", evaluate)
    assert main(lm_flags(text, out)) == 130
    monkeypatch.undo()
    one_error_line(capsys, "before the first checkpoint", f"-o {out} --resume` starts the run from its beginning")
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    assert main(["train", "lm-adapt", "-o", str(out), "--resume"]) == 0
    assert_same_run(straight, out)


def test_vit_recipe_stops_on_sigint_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / label / f"{i}.png"
                )
    flags = [
        "train",
        "vit-imagenet",
        "--data",
        str(tmp_path / "data"),
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--epochs",
        "2",
        "--no-augment",
        "--no-progress",
        "--cpu",
        "--lr",
        "1e-3",
    ]
    assert main([*flags, "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    signal_at_step(monkeypatch, 2)
    assert main([*flags, "-o", str(tmp_path / "b")]) == 130
    monkeypatch.undo()
    one_error_line(capsys, "checkpoint at step 2", "train vit-imagenet")
    assert main(["train", "vit-imagenet", "-o", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (modadapt.load(tmp_path / d / "model").state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_of_a_real_process(text, tmp_path):
    """SIGINT to `modadapt train lm-adapt` in a subprocess once it has checkpointed: exit 130, one
    line naming the resume command, and the resumed run equals an uninterrupted one."""
    steps = "200"
    reference = tmp_path / "reference"
    assert main(lm_flags(text, reference, steps)) == 0
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modadapt.cli", *lm_flags(text, out, steps, "--save-every", "1")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "trainer_state.json").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "stopped with a checkpoint at step" in err and "--resume" in err
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 0 < step < int(steps)
    assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--save-every", "0"]) == 0
    assert_same_run(reference, out)
