"""Several processes: DDP for the three recipes and FSDP for lm-adapt, on CPU over gloo.

The multi-process tests launch `torchrun` / `accelerate launch` with 2 processes on tiny presets
and compare with one process on the same global batch (batch 2B on one process, B on each of
two): the same loss curve, learning rates and saved model; resume works under 2 processes.
"""

from __future__ import annotations

import pickle

import torch

import modadapt


def test_model_output_with_router_aux_loss_survives_pytree():
    """DDP's find_unused_parameters takes a forward's output apart and builds it again with
    torch's pytree; the loss-carrying output keeps its `router_aux_loss` key through that."""
    from torch.utils import _pytree as pytree

    model = modadapt.convert(modadapt.build_preset("tiny-llama", seed=0), router="topk", capacity=0.5).train()
    x = torch.randint(0, 100, (2, 8))
    out = model(x, labels=x)
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, spec)
    assert list(again.keys()) == list(out.keys()) == ["loss", "logits", "router_aux_loss"]
    assert torch.equal(again.router_aux_loss, out.router_aux_loss) and torch.equal(again.loss, out.loss)
    assert isinstance(again, type(out).__mro__[1])  # still the model's own output type
    assert list(pickle.loads(pickle.dumps(out)).keys()) == list(out.keys())



def test_threshold_load_over_processes_equals_the_whole_batch():
    """threshold-p's load loss takes the kept fraction of the global batch within
    `statistics_over_processes`: two halves on two "processes" (the other's counts added by the
    sum) average to the whole batch's loss and gradient, as DDP averages them."""
    from modadapt.routers.base import RoutingContext, statistics_over_processes
    from modadapt.routers.threshold import ThresholdRouter

    torch.manual_seed(0)
    router = ThresholdRouter(8, 0.5, 0)
    with torch.no_grad():
        router.scorer.weight.normal_()
    hidden = torch.randn(4, 6, 8)

    def aux(rows, process_sum=None):
        h = hidden[rows]
        ctx = RoutingContext(layer_index=0, real=None, forced=None, positions=torch.arange(6).expand(len(h), 6),
                             causal=False, training=True)
        router.zero_grad()
        logits = router.score(h, ctx)
        keep = router.causal_keep(logits, h, ctx)
        if process_sum is None:
            loss = router.aux_loss(logits, keep, h, ctx)
        else:
            with statistics_over_processes(process_sum):
                loss = router.aux_loss(logits, keep, h, ctx)
        loss.backward()
        return loss.detach(), router.scorer.weight.grad.clone()

    whole, whole_grad = aux(slice(0, 4))
    counts = {}
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):
        aux(rows, lambda t, name=name: counts.setdefault(name, t.clone()))
    a, a_grad = aux(slice(0, 2), lambda t: t + counts["b"])
    b, b_grad = aux(slice(2, 4), lambda t: t + counts["a"])
    torch.testing.assert_close((a + b) / 2, whole)
    torch.testing.assert_close((a_grad + b_grad) / 2, whole_grad)
    local, _ = aux(slice(0, 2))  # outside the context: the process's own kept fraction
    assert not torch.allclose(local, a)


# --- launching 2 processes --------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _no_gloo_reason() -> str | None:
    """Why 2 CPU processes cannot form a gloo group here (None: they can)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend (needed for several CPU processes)"
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError as exc:
        return f"cannot open a local TCP port for the process group's rendezvous: {exc}"
    return None


needs_gloo = pytest.mark.skipif(_no_gloo_reason() is not None, reason=str(_no_gloo_reason()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], *, launcher: str = "torchrun", fsdp: bool = False, timeout: float = 240) -> str:
    """`modadapt <args>` on 2 CPU processes (this checkout's code); returns rank 0's stdout.

    `torchrun`: ``torchrun --nproc_per_node 2 -m modadapt.cli``; `accelerate`: ``accelerate
    launch --multi_gpu --num_processes 2 -m modadapt.cli`` (with `fsdp`: FSDP2, full sharding,
    transformer-layer auto wrap), as docs/recipes.md gives them; the recipe's --cpu is in `args`.
    """
    port = str(free_port())
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", port]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", port]
        head += (["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
                  "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
                 if fsdp else ["--multi_gpu"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.run([*head, "-m", "modadapt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    print(f"2 processes ({launcher}{', fsdp' if fsdp else ''}): {time.perf_counter() - started:.1f} s")
    return proc.stdout


def history(run_dir: Path) -> dict:
    """The loop's per-step history a run left (its trainer state)."""
    return json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["history"]


def assert_same_history(one: dict, two: dict, keys=("loss", "kept_fraction", "lr")) -> None:
    for key in keys:
        assert len(one[key]) == len(two[key]), key
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-4, atol=atol, msg=name)


@pytest.fixture(scope="module")
def images16(tmp_path_factory):
    """An imagefolder of 16 training images (two global batches of 8) and 4 validation ones."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images16")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


@needs_gloo
def test_vit_ddp_two_processes_match_one_and_keep_the_lr_schedule(images16, tmp_path):
    """2 processes x batch 4 = 1 process x batch 8: the same losses, kept fractions and learning
    rates step by step (the cosine used to reach 0 after half of a 2-process run), the same
    trained model, written once; eval counts each validation image once."""
    from modadapt.recipes.vit_imagenet import ViTRecipeConfig, run

    common = dict(data=str(images16), epochs=3, augment=False, lr=1e-3, warmup_steps=1, eval_batch_size=4,
                  progress=False, cpu=True)
    one = run(ViTRecipeConfig(output=str(tmp_path / "one"), batch_size=8, **common))
    out = launch(["train", "vit-imagenet", "--data", str(images16), "-o", str(tmp_path / "two"), "--batch-size", "4",
                  "--epochs", "3", "--no-augment", "--lr", "1e-3", "--warmup-steps", "1", "--eval-batch-size", "4",
                  "--no-progress", "--cpu"])
    assert out.count("top-1 ") == 1  # one report, from the first process
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["steps"] == two["steps"] == 6
    h1, h2 = history(tmp_path / "one"), history(tmp_path / "two")
    assert_same_history(h1, h2)
    assert h2["lr"][-1] > 0 and h2["lr"] == h1["lr"]  # the schedule counts optimizer steps, not processes
    assert two["eval"]["images"] == 4 and two["eval"]["top1"] == one["eval"]["top1"]
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    assert two["eval"]["kept_fraction"] == pytest.approx(one["eval"]["kept_fraction"])
    assert_same_weights(modadapt.load(tmp_path / "one" / "model"), modadapt.load(tmp_path / "two" / "model"))
