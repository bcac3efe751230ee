"""Several processes: DDP for the three recipes and FSDP for lm-adapt, on CPU over gloo.

The multi-process tests launch `torchrun` / `accelerate launch` with 2 processes on tiny presets
and compare with one process on the same global batch (batch 2B on one process, B on each of
two): the same loss curve, learning rates and saved model; resume works under 2 processes.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
        ctx = RoutingContext(
            layer_index=0,
            real=None,
            forced=None,
            positions=torch.arange(6).expand(len(h), 6),
            causal=False,
            training=True,
        )
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


def test_fsdp_wrap_names_find_the_mod_layer_classes():
    """FSDP's transformer auto-wrap looks classes up by exact name; the MoD subclasses modadapt
    makes (`ModLlamaDecoderLayer`) are found from their original's name, also where no layer
    of the original class is left."""
    from torch import nn

    from modadapt.mod_layer import mod_class
    from modadapt.recipes.training import fsdp_wrap_names

    model = modadapt.convert(modadapt.build_preset("tiny-llama", seed=0), router="topk", capacity=0.5)
    assert fsdp_wrap_names(model, ["LlamaDecoderLayer"]) == ["LlamaDecoderLayer", "ModLlamaDecoderLayer"]
    only_mod = nn.Sequential(mod_class(nn.Linear)(2, 2), mod_class(nn.Linear)(2, 2))
    assert fsdp_wrap_names(only_mod, ["Linear"]) == ["ModLinear"]
    assert fsdp_wrap_names(only_mod, ["Conv2d"]) == []


def test_meta_copy_takes_a_gathered_state_and_saves(tmp_path):
    """What the first process of an FSDP run keeps: a weightless copy (rotary buffers real), into
    which the gathered full state dict loads, views into one buffer copied out, ties kept; it
    saves and loads as the model itself."""
    from modadapt.recipes.training import load_full_state, meta_copy

    model = modadapt.convert(modadapt.build_preset("tiny-llama", seed=0), router="threshold-p")
    skeleton, inner = meta_copy(model, model)
    assert inner is skeleton and all(p.is_meta for p in skeleton.parameters())
    state = model.state_dict()
    flat = torch.cat([t.flatten() for t in state.values()])  # as FSDP may gather: views into one buffer
    views, at = {}, 0
    for name, t in state.items():
        views[name] = flat[at : at + t.numel()].view_as(t)
        at += t.numel()
    load_full_state(skeleton, views)
    modadapt.save(skeleton, tmp_path / "m")
    again = modadapt.load(tmp_path / "m")
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)


def test_launch_mistakes_are_clear_errors(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs the script once (an error naming the
    commands that work), and FSDP is lm-adapt's only; both before accelerate starts."""
    from types import SimpleNamespace

    from modadapt.errors import ModAdaptError
    from modadapt.recipes.training import make_accelerator

    cfg = SimpleNamespace(cpu=True, mixed_precision="no", recipe="vit-imagenet")
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_USE_CPU", "True")
        env.setenv("MASTER_ADDR", "127.0.0.1")
        with pytest.raises(ModAdaptError, match=r"single process.*--multi_gpu --num_processes N.*torchrun"):
            make_accelerator(cfg)
    with monkeypatch.context() as env:
        env.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ModAdaptError, match="FSDP .* lm-adapt only"):
            make_accelerator(cfg)


# --- launching 2 processes --------------------------------------------------------------------------
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


def needs_gloo(test):
    """A test that launches 2 processes: marked `processes`, skipped (saying why) without gloo."""
    reason = _no_gloo_reason()
    return pytest.mark.processes(pytest.mark.skipif(reason is not None, reason=str(reason))(test))


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
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        head = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
        ]
        head += (
            [
                "--use_fsdp",
                "--fsdp_version",
                "2",
                "--fsdp_reshard_after_forward",
                "true",
                "--fsdp_auto_wrap_policy",
                "TRANSFORMER_BASED_WRAP",
                "--fsdp_state_dict_type",
                "SHARDED_STATE_DICT",
            ]
            if fsdp
            else ["--multi_gpu"]
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [*head, "-m", "modadapt.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
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
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png"
                )
    return root


@needs_gloo
def test_vit_ddp_two_processes_match_one_and_keep_the_lr_schedule(images16, tmp_path):
    """2 processes x batch 4 = 1 process x batch 8: the same losses, kept fractions and learning
    rates step by step (the cosine used to reach 0 after half of a 2-process run), the same
    trained model, written once; eval counts each validation image once."""
    from modadapt.recipes.vit_imagenet import ViTRecipeConfig, run

    common = dict(
        data=str(images16),
        epochs=3,
        augment=False,
        lr=1e-3,
        warmup_steps=1,
        eval_batch_size=4,
        progress=False,
        cpu=True,
    )
    one = run(ViTRecipeConfig(output=str(tmp_path / "one"), batch_size=8, **common))
    out = launch(
        [
            "train",
            "vit-imagenet",
            "--data",
            str(images16),
            "-o",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
            "--epochs",
            "3",
            "--no-augment",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--eval-batch-size",
            "4",
            "--no-progress",
            "--cpu",
        ]
    )
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import SAMPLE_TEXT

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def lm_flags(corpus, out, *extra) -> list[str]:
    """lm-adapt (threshold-p, no distillation unless `extra` asks) on 64 training blocks of 32
    tokens (8 global batches of 8), 6 validation ones."""
    return [
        "train",
        "lm-adapt",
        "--data",
        str(corpus),
        "-o",
        str(out),
        "--seq-len",
        "32",
        "--max-train-blocks",
        "64",
        "--lr",
        "1e-2",
        "--no-progress",
        "--cpu",
        "--router",
        "threshold-p",
        "--distill",
        "0",
        *extra,
    ]


def lm_one_process(corpus, out, batch_size: int, *extra, resume_to: int | None = None) -> dict:
    """The same recipe in this process (1 process), optionally resumed to more steps."""
    from modadapt.cli import main

    assert main(lm_flags(corpus, out, "--batch-size", str(batch_size), *extra)) == 0
    if resume_to:
        assert main(["train", "lm-adapt", "-o", str(out), "--resume", "--max-steps", str(resume_to)]) == 0
    return json.loads((out / "summary.json").read_text())


@needs_gloo
def test_lm_adapt_ddp_two_processes_match_one_and_resume(corpus, tmp_path):
    """lm-adapt (threshold-p, every weight trains after a router-only step) on 2 processes x
    batch 4, stopped after 2 steps and resumed to 4, equals 1 process x batch 8 run the same way:
    losses (LM, routers' load loss over the global batch), kept fractions and learning rates per
    step, the adapted validation loss, and the saved model, written once by the first process."""
    extra = ("--train", "all", "--router-steps", "1", "--max-steps", "2", "--save-every", "1")
    one = lm_one_process(corpus, tmp_path / "one", 8, *extra, resume_to=4)
    out = launch(lm_flags(corpus, tmp_path / "two", "--batch-size", "4", *extra))
    assert out.count("valid perplexity") == 1
    out = launch(["train", "lm-adapt", "-o", str(tmp_path / "two"), "--resume", "--max-steps", "4"])
    assert out.count("valid perplexity") == 1
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["processes"], two["sharding"], two["steps"]) == (2, "ddp", 4) and one["processes"] == 1
    assert_same_history(one["history"], two["history"], keys=("loss", "lm_loss", "aux_loss", "kept_fraction", "lr"))
    assert min(two["history"]["kept_fraction"]) < 1.0  # the routers did skip tokens
    assert two["valid_loss"]["converted_after"] == pytest.approx(one["valid_loss"]["converted_after"], rel=1e-5)
    assert two["kept_fraction"]["after"] == pytest.approx(one["kept_fraction"]["after"], abs=1e-6)
    files = sorted(p.name for p in (tmp_path / "two" / "model").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one" / "model").iterdir()) and "model.safetensors" in files
    assert_same_weights(modadapt.load(tmp_path / "one" / "model"), modadapt.load(tmp_path / "two" / "model"))


@needs_gloo
def test_lm_adapt_two_processes_set_one_process_s_inference_cut_offs(corpus, tmp_path):
    """topk on 2 processes x batch 4: after training, the cut-offs set for inference routing (the
    main process's, sent to both) are those 1 process x batch 8 sets, and so are the kept
    fractions they give (training's running averages differ: a mean of per-process cut-offs)."""
    extra = ("--router", "topk", "--capacity", "0.25", "--max-steps", "2", "--calibrate-blocks", "8")
    one = lm_one_process(corpus, tmp_path / "one", 8, *extra)
    launch(lm_flags(corpus, tmp_path / "two", "--batch-size", "4", *extra))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and set(two["calibrated_cutoffs"]["inference"]) == {"1", "3"}
    for layer, cut in one["calibrated_cutoffs"]["inference"].items():
        assert two["calibrated_cutoffs"]["inference"][layer] == pytest.approx(cut, abs=1e-5)
    assert two["kept_fraction"]["after"] == pytest.approx(one["kept_fraction"]["after"], abs=1e-6)


@needs_gloo
def test_lm_adapt_fsdp_two_cpu_processes_match_one(corpus, tmp_path):
    """FSDP2 through accelerate's plugin (full sharding, transformer-layer auto wrap) on 2 CPU
    processes: every decoder layer, the MoD ones too, and every router is its own unit; LoRA
    with distillation from the model itself trains as on 1 process; the saved directory,
    gathered on the first process, loads and gives the 1-process model's logits."""
    pytest.importorskip("peft")
    extra = ("--train", "lora", "--distill", "0.5", "--max-steps", "3")
    one = lm_one_process(corpus, tmp_path / "one", 8, *extra)
    out = launch(lm_flags(corpus, tmp_path / "two", "--batch-size", "4", *extra), launcher="accelerate", fsdp=True)
    assert out.count("valid perplexity") == 1
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["processes"], two["sharding"]) == (2, "fsdp")
    # tiny-llama: 4 layers (1 and 3 converted), their 2 routers, embedding, the tail (norm + head), the root
    assert two["fsdp_units"] == {
        "Embedding": 1,
        "LlamaDecoderLayer": 2,
        "ModLlamaDecoderLayer": 2,
        "PeftModel": 1,
        "ThresholdRouter": 2,
        "Linear": 1,
    }
    assert_same_history(
        one["history"], two["history"], keys=("loss", "lm_loss", "aux_loss", "distill_loss", "kept_fraction", "lr")
    )
    assert two["valid_loss"]["converted_after"] == pytest.approx(one["valid_loss"]["converted_after"], rel=1e-5)
    a, b = modadapt.load(tmp_path / "one" / "model"), modadapt.load(tmp_path / "two" / "model")
    assert type(b.model.layers[1]).__name__ == "ModLlamaDecoderLayer"  # a plain model again, LoRA merged
    assert_same_weights(a, b)
    ids = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=1e-4, atol=1e-5)


@needs_gloo
def test_llava_adapt_ddp_two_processes_match_one(tmp_path):
    """llava-adapt (shared-vl router) on 2 processes x batch 2 equals 1 process x batch 4 (every
    answer one digit, so each process's loss averages as many tokens): losses, kept fractions,
    learning rates, the evaluation (on the first process) and the saved model."""
    from PIL import Image

    from modadapt.recipes.llava_adapt import LlavaRecipeConfig, run

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 10 * i, 0)).save(data / f"{i}.png")
    records = [
        {
            "image": f"{i}.png",
            "conversations": [{"from": "human", "value": "What is <image>\nthis?"}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(8)
    ]
    (data / "data.json").write_text(json.dumps(records))
    common = dict(
        data=str(data / "data.json"),
        eval_data=str(data / "data.json"),
        epochs=2,
        lr=1e-3,
        warmup_steps=1,
        max_new_tokens=2,
        progress=False,
        cpu=True,
    )
    one = run(LlavaRecipeConfig(output=str(tmp_path / "one"), batch_size=4, **common))
    out = launch(
        [
            "train",
            "llava-adapt",
            "--data",
            common["data"],
            "--eval-data",
            common["eval_data"],
            "-o",
            str(tmp_path / "two"),
            "--batch-size",
            "2",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--max-new-tokens",
            "2",
            "--no-progress",
            "--cpu",
        ]
    )
    assert out.count("accuracy ") == 1
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["steps"] == two["steps"] == 4
    assert_same_history(history(tmp_path / "one"), history(tmp_path / "two"))
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    assert two["eval"]["accuracy"] == one["eval"]["accuracy"]
    assert_same_weights(modadapt.load(tmp_path / "one" / "model"), modadapt.load(tmp_path / "two" / "model"))
