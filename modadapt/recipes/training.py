"""What every recipe shares: the run directory, its checkpoint, the training loop, the LR schedule,
the eval device."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModAdaptError
from ..mod_layer import state_of
from ..output_dir import write_atomic


def distillation_kl(student_logits, teacher_logits, temperature: float, mask=None):
    """KL(teacher || student) of the next-token distributions at `temperature`, times its square
    (so gradients keep their scale), averaged over tokens (`mask` `[B, T]`: the tokens counted)."""
    import torch.nn.functional as F

    student, teacher = student_logits.float(), teacher_logits.float()
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    else:
        student, teacher = student.flatten(0, -2), teacher.flatten(0, -2)
    if not len(student):
        return student.sum() * 0.0
    return (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def eval_device(device: str | None):
    """The `torch.device` ``modadapt eval`` runs on: `device` checked (CUDA must be there), or CUDA
    when available, else CPU (as the recipes train)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModAdaptError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ModAdaptError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return chosen


def lr_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def launched_rank() -> int:
    """This process's rank under a distributed launcher (``RANK`` or an MPI launcher's), 0 without
    one: known before the process group exists."""
    import os

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun / ``accelerate launch
    --multi_gpu``, or an MPI launcher's size); 1 without a distributed launcher."""
    import os

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


SEVERAL_PROCESSES = (
    "start several processes with `accelerate launch --multi_gpu --num_processes N -m modadapt.cli "
    "train ...` (add the recipe's --cpu flag on a CPU machine) or `torchrun --nproc_per_node N -m "
    'modadapt.cli train ...`; see docs/recipes.md, "Several processes"'
)


def make_accelerator(cfg, *, fsdp: bool = False, **kwargs):
    """The `accelerate.Accelerator` a recipe trains with, for one process or several.

    One process: ``Accelerator(mixed_precision, cpu=cfg.cpu)`` as always. Several (a distributed
    launcher's environment): on a machine without an accelerator device, or with ``cfg.cpu``, the
    processes form a gloo group on CPU (accelerate runs them as independent single processes
    unless told ``cpu``); DDP is told that a step may leave parameters without a gradient
    (`find_unused_parameters`: a layer whose router kept no token of a process's batch, frozen
    stages). FSDP (``accelerate launch --use_fsdp``) is accepted only where `fsdp` (lm-adapt); on
    CPU it is switched on by hand, since accelerate ties its FSDP mode to GPU-like devices
    (`enable_fsdp_on_cpu`). A launch whose processes did not join one group is an error, not a
    run trained N times over.
    """
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    world = launched_processes()
    env_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world == 1 and env_cpu and os.environ.get("MASTER_ADDR"):
        # `accelerate launch --cpu --num_processes N` (N > 1) sets MASTER_ADDR but runs this script once.
        raise ModAdaptError(
            f"`accelerate launch --cpu` starts a single process whatever --num_processes says; {SEVERAL_PROCESSES}."
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if wants_fsdp and not fsdp:
        raise ModAdaptError(
            f"{cfg.recipe} trains with DDP on several processes; FSDP (accelerate launch --use_fsdp) "
            "is supported by lm-adapt only."
        )
    cpu = cfg.cpu
    if world > 1 and not cpu and not torch.accelerator.is_available():
        cpu = True  # several CPU processes: gloo
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if world > 1:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, kwargs_handlers=handlers, **kwargs)
    if world > 1 and accelerator.num_processes != world:
        raise ModAdaptError(
            f"the launcher started {world} processes but accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type}); {SEVERAL_PROCESSES}."
        )
    if wants_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        enable_fsdp_on_cpu(accelerator)
    if wants_fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ModAdaptError(
            f"FSDP was asked for but accelerate runs {accelerator.distributed_type} on "
            f"{accelerator.num_processes} process(es); launch with `accelerate launch --use_fsdp "
            "--num_processes N` (N > 1)."
        )
    return accelerator


def enable_fsdp_on_cpu(accelerator) -> None:
    """Turn a multi-CPU (gloo) accelerator into an FSDP one, with the FSDP plugin from the launch
    environment. accelerate only enters its FSDP mode on GPU-like devices, although FSDP2
    (`fully_shard`) shards and gathers over gloo on CPU; only FSDP2 is supported here."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ModAdaptError(
            "FSDP on CPU needs FSDP2 (accelerate launch --use_fsdp --fsdp_version 2): accelerate's "
            "FSDP1 wants a GPU-like device (with sync_module_states, its launch default) and FSDP1 "
            "refuses the CPU device accelerate gives it ('Inconsistent compute device and `device_id`: "
            "cpu vs cpu:0')."
        )
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does for GPUs


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_wrap_names(model, names: list[str]) -> list[str]:
    """The class names to give FSDP's transformer auto-wrap policy for `names` (decoder layer
    classes, e.g. ``LlamaDecoderLayer``): each one the model has, and the MoD subclass modadapt
    made of it (``ModLlamaDecoderLayer``, see `mod_layer.mod_class`), which accelerate's lookup
    by exact class name would miss, so that every converted layer is its own FSDP unit too (all
    of them when every layer is converted and the original name is gone)."""
    present = {type(m).__name__: type(m) for m in model.modules()}
    found: list[str] = []
    for name in names:
        matches = [
            n for n, cls in present.items() if n == name or getattr(cls, "_mod_original", type(None)).__name__ == name
        ]
        found += [n for n in sorted(matches) if n not in found]
    return found


def set_fsdp_wrap(accelerator, model) -> None:
    """Before `prepare`: the FSDP units of a converted model. With the transformer-based
    auto-wrap policy (chosen, or none chosen: no ``--fsdp_auto_wrap_policy``) each decoder layer
    is a unit, MoD or not (by class, as `fsdp_wrap_names` extends them: the names given with
    ``--fsdp_transformer_layer_cls_to_wrap``, else the model's ``_no_split_modules``, else the
    layer stack's own classes), and so is each router with parameters (`finish_fsdp_wrap`
    keeps its few weights gathered from forward to backward). ``NO_WRAP`` (the whole model one
    unit) is left as chosen; a size-based policy is refused: it could put a router in its
    layer's unit, whose weights FSDP frees after the forward although the router's auxiliary
    loss, or a layer that kept no token, reaches them in the backward without passing through
    the layer's output, where FSDP gathers them again."""
    import os

    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    from ..convert import mod_layers
    from ..metrics.layer_stack import find_layers
    from ..mod_layer import state_of

    plugin = accelerator.state.fsdp_plugin
    # Every process built the same model itself (before the process group existed, so transformers
    # loaded it whole everywhere); accelerate's rank-0 broadcast instead (cpu_ram_efficient_loading,
    # on by default in `accelerate launch`) fails on buffers in the state dict, such as the routers'
    # calibrated cut-offs.
    plugin.cpu_ram_efficient_loading = False
    chosen = os.environ.get("FSDP_AUTO_WRAP_POLICY")
    if plugin.auto_wrap_policy is size_based_auto_wrap_policy:
        raise ModAdaptError(
            "FSDP: use --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP (or leave it out) with a MoD "
            "model: a size-based policy can leave a router inside its layer's unit, which breaks "
            "the backward of its auxiliary loss."
        )
    if chosen is not None and plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return  # NO_WRAP
    names = plugin.transformer_cls_names_to_wrap or list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        names = sorted({getattr(type(layer), "_mod_original", type(layer)).__name__ for layer in find_layers(model)})
    wrap = fsdp_wrap_names(model, names)
    if not wrap:
        raise ModAdaptError(
            f"FSDP: the model has no layer of the classes {names} to wrap; give the decoder layer "
            "class with --fsdp_transformer_layer_cls_to_wrap."
        )
    inner = next((m for m in model.modules() if state_of(m) is not None), None)
    routers = (
        sorted(
            {type(layer.router).__name__ for layer in mod_layers(inner) if any(True for _ in layer.router.parameters())}
        )
        if inner is not None
        else []
    )
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = wrap + [name for name in routers if name not in wrap]


def finish_fsdp_wrap(model) -> None:
    """After `prepare`: each router unit gathers its weights for `Router.route` (what the MoD
    layer calls, not `forward`) and keeps them until the backward has used them (they are a
    few vectors)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    from ..convert import mod_layers
    from ..mod_layer import state_of

    inner = next((m for m in model.modules() if state_of(m) is not None), None)
    seen = set()
    for layer in mod_layers(inner) if inner is not None else []:
        router = layer.router
        if isinstance(router, FSDPModule) and id(router) not in seen:
            seen.add(id(router))
            router.set_reshard_after_forward(False)
            register_fsdp_forward_method(router, "route")


def fsdp_units(model) -> dict[str, int]:
    """How many FSDP units of each class (as before FSDP renamed it) an FSDP-prepared model has."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            name = type(module).__name__.removeprefix("FSDP")
            units[name] = units.get(name, 0) + 1
    return dict(sorted(units.items()))


def meta_copy(model, inner=None):
    """A copy of `model` with every parameter and state-dict buffer on the meta device (no
    memory; the buffers a state dict leaves out, such as rotary frequencies, are copied), and the
    copy of `inner` (a module inside it) when given: `(copy, inner's copy)`. What the main
    process keeps of an FSDP run, to load the gathered full state dict into and save."""
    import copy
    import itertools

    import torch
    from torch import nn

    kept = {
        id(buffer)
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name in module._non_persistent_buffers_set
    }
    memo: dict = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in kept:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    copied = copy.deepcopy(model, memo)
    return (copied, memo[id(inner)]) if inner is not None else copied


def load_full_state(model, state: dict) -> None:
    """Load a gathered full state dict (`Accelerator.get_state_dict` of an FSDP model) into a
    `meta_copy`: its tensors replace the meta ones (tied weights tied again). A tensor that is a
    view into a larger gathered buffer is copied out (safetensors saves whole storages only)."""
    for name, tensor in state.items():
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            state[name] = tensor.clone()
    model.load_state_dict(state, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModAdaptError(f"FSDP: the gathered state dict lacks {left[:5]}; cannot save the model.")


def mean_over_processes(accelerator, values: list[float]) -> list[float]:
    """`values` (one per name, the same names on every process) averaged over the processes;
    as they are with one."""
    if accelerator.num_processes == 1:
        return values
    import torch

    reduced = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "mean")
    return reduced.tolist()


STATE_FILE = "trainer_state.json"


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM; the message says how to continue (the CLI exits 130)."""


class _SharedRouterFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor ..." warning when every tensor it names is a
    router's: a router shared by several layers (shared-vl) is one tensor under several names by
    design, saved once and tied again on load."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Removed shared tensor" not in message:  # accelerate may prefix "[RANK 0] "
            return True
        names = re.findall(r"'([^']+)'", message)
        return not names or not all(".router." in f".{name}." for name in names)


@contextlib.contextmanager
def quiet_shared_routers():
    """Within: accelerate does not warn about shared router tensors while saving a checkpoint."""
    logger, rule = logging.getLogger("accelerate.utils.other"), _SharedRouterFilter()
    logger.addFilter(rule)
    try:
        yield
    finally:
        logger.removeFilter(rule)


class RunCheckpoint:
    """The run directory of a recipe, used as a context manager around its run.

    Holds ``config.yaml`` and ``checkpoint/``: accelerate's state (model, optimizer, scheduler,
    RNG) in ``step-N/`` plus ``trainer_state.json``, the loop's own state (step, ...), replaced
    last, so a crash mid-save keeps the previous checkpoint. A fresh run refuses a non-empty
    directory, writes ``config.yaml`` first (a run stopped before its first checkpoint resumes from
    its beginning) and removes what it wrote when it fails (an exception, not a signal) before its
    first checkpoint. A resumed run must match the saved ``config.yaml`` outside `cfg.resumable` and
    writes nothing before its checkpoint has loaded. Under a launcher of several processes only
    the first (``RANK`` 0) checks, writes and cleans up the directory.

    SIGINT / SIGTERM before `start` stop at once; from `start` to `end` the loop stops at the next
    step boundary (`check_stop`) with a checkpoint; a second signal stops at once.
    """

    def __init__(self, cfg):
        from .config import check_resumable, read_run_config

        self.cfg = cfg
        self.out = Path(cfg.output)
        self.dir = self.out / "checkpoint"
        self.state_file = self.dir / STATE_FILE
        self.existed = self.out.exists()
        # Under a launcher of several processes only the first checks and writes the directory
        # (the others would find its config.yaml); a failure there stops them all.
        self.main = launched_rank() == 0
        if cfg.resume:
            check_resumable(cfg, read_run_config(cfg.output, type(cfg)))
        elif self.main and self.existed and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ModAdaptError(f"{self.out} exists and is not empty; choose a new output directory or pass --resume.")
        self.in_loop = False
        self.signal_name: str | None = None
        self.saved_step: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> RunCheckpoint:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        if not self.cfg.resume and self.main:
            self.write_config()
        return self

    def write_config(self) -> None:
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "config.yaml", yaml.safe_dump(asdict(self.cfg), sort_keys=True))

    def __exit__(self, kind, exc, tb) -> bool:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if (
            kind is not None
            and issubclass(kind, Exception)
            and not self.cfg.resume
            and self.saved_step is None
            and self.main
        ):
            shutil.rmtree(
                self.out, ignore_errors=True
            )  # a fresh run failing before its first checkpoint leaves nothing
            if self.existed:
                self.out.mkdir(parents=True, exist_ok=True)
        return False

    def _on_signal(self, signum, frame) -> None:
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if not (self.in_loop and first):
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        command = f"modadapt train {self.cfg.recipe} -o {shlex.quote(str(self.out))} --resume"
        # several processes: the same launch again (each process has its part of the checkpoint)
        launch = f" under the same launcher ({launched_processes()} processes)" if launched_processes() > 1 else ""
        if self.state_file.is_file():
            step = json.loads(self.state_file.read_text())["step"]
            return Interrupted(
                f"{self.signal_name}: stopped with a checkpoint at step {step}; continue with `{command}`{launch}."
            )
        if (self.out / "config.yaml").is_file():
            return Interrupted(
                f"{self.signal_name}: stopped before the first checkpoint; `{command}` starts the run "
                "from its beginning."
            )
        return Interrupted(f"{self.signal_name}: stopped before the run wrote anything; run the same command again.")

    def start(self, accelerator) -> dict | None:
        """Begin the loop: load the checkpoint of a resumed run (its loop state, or None when it has
        none yet), then record the fields it changed in ``config.yaml``."""
        if not self.cfg.resume:
            self.in_loop = True
            return None
        state = None
        if self.state_file.is_file():
            try:
                state = json.loads(self.state_file.read_text())
                saved = self.dir / f"step-{state['step']}"
                accelerator.load_state(str(saved if saved.is_dir() else self.dir))  # else the older flat layout
            except Exception as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModAdaptError(
                    f"resume: cannot load the checkpoint in {self.dir} ({reason}); it is truncated, "
                    "corrupt or from another model."
                ) from None
            self.saved_step = state["step"]
        if accelerator.is_main_process:
            self.write_config()
        accelerator.wait_for_everyone()
        self.in_loop = True
        return state

    def save(self, accelerator, state: dict) -> None:
        """Checkpoint at `state["step"]` (once per step): the state directory first, then the
        pointer to it, then the older directories go."""
        if state["step"] == self.saved_step:
            return
        target = self.dir / f"step-{state['step']}"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and target.exists():
            shutil.rmtree(target)  # left by a crash: the pointer never named it
        accelerator.wait_for_everyone()
        with quiet_shared_routers():
            accelerator.save_state(str(target))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomic(self.state_file, json.dumps(state))
            for old in self.dir.glob("step-*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.saved_step = state["step"]

    def check_stop(self, accelerator, state: dict) -> None:
        """At a step boundary: if a signal asked to stop (any process), checkpoint and raise `Interrupted`."""
        requested = self.signal_name is not None
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([float(requested)], device=accelerator.device)
            requested = bool(accelerator.reduce(flag, reduction="sum").item())
        if requested:
            self.signal_name = self.signal_name or "SIGINT"
            if state["step"]:
                self.save(accelerator, state)
            raise self.interrupted()

    def end(self, accelerator, state: dict) -> None:
        """The loop is done: the last checkpoint; from here a signal stops at once."""
        self.save(accelerator, state)
        self.in_loop = False


def resume_field():
    """The recipes' `resume` option (carried out by `RunCheckpoint`), one help text for all."""
    return field(
        default=False,
        metadata={
            "help": "continue the run in -o from its last checkpoint with its config.yaml; other flags may change only "
            "steps, checkpointing, evaluation and progress"
        },
    )


def cpu_field():
    """The recipes' `cpu` option (see `eval_device` and the process group), one help text for all."""
    return field(
        default=False, metadata={"help": "run on CPU even if a GPU is present (several processes: a gloo group)"}
    )


@dataclass
class LoopResult:
    """What `train_loop` leaves: the prepared model, the optimizer steps taken (over all resumes),
    the skipped ones, the per-step `history` and this process's wall seconds per step."""

    model: Any
    step: int
    bad_steps: int
    history: dict[str, list[float]]
    step_times: list[float] = field(default_factory=list)


def train_loop(
    cfg,
    accelerator,
    model,
    optimizer,
    scheduler,
    train_set,
    loss_fn,
    checkpoint: RunCheckpoint,
    *,
    total_steps: int,
    params: list | None = None,
    converted=None,
    max_bad_steps: int | None = None,
    schedule=None,
    logged: tuple[str, ...] = (),
    epoch_checkpoints: bool = False,
    collate_fn=None,
    num_workers: int = 0,
    desc: str = "train",
) -> LoopResult:
    """The training loop of every recipe, so that resuming, accumulation, skipping and the
    adaptation schedule mean the same thing in each (and are tested once).

    `model`, `optimizer` (and `scheduler`, or registered for checkpointing) are already prepared by
    `accelerator`. Each epoch reshuffles `train_set` with ``cfg.seed + epoch``, so a resumed run
    (its checkpoint loaded by `checkpoint.start`) skips to the same batch. An optimizer step is
    the accelerator's ``gradient_accumulation_steps`` micro-batches; an epoch's partial
    accumulation is dropped. `loss_fn(model, batch,
    accelerator)` returns ``(loss, parts)``: `parts` are floats named in `logged`, averaged over the
    step into ``history`` beside ``loss``, ``kept_fraction`` (of `converted`'s routers) and ``lr``
    (the first parameter group's, as the step used it). With several processes each process
    takes its share of every batch (accelerate's data loader) and the history is the mean over
    the processes, the global batch's; a non-finite loss on any process skips the step on all.
    `params` (default: the model's) are clipped at ``cfg.grad_clip`` and, with a `schedule`
    (`AdaptationSchedule`), held during its router stage. With `max_bad_steps`, a step whose loss
    (or, outside fp16, gradient norm) is not finite is skipped, and one too many aborts the run.
    Checkpoints: every ``cfg.save_every`` steps, at epoch ends with `epoch_checkpoints`, at the end
    and when a signal stops the run. `cfg` needs batch_size, seed, grad_clip, save_every, progress
    and mixed_precision.
    """
    import torch
    from tqdm.auto import tqdm

    from ..metrics.routing_stats import routing_stats
    from ..routers.base import statistics_over_processes

    params = list(model.parameters()) if params is None else params
    grad_accum = accelerator.gradient_accumulation_steps
    keys = ("loss", *logged)
    history: dict[str, list[float]] = {key: [] for key in (*keys, "kept_fraction", "lr")}
    step = bad_steps = 0
    saved = checkpoint.start(accelerator)
    if saved:  # an image recipe's checkpoint from before this loop holds the step only
        step, bad_steps = saved["step"], saved.get("bad_steps", 0)
        history = {**history, **saved.get("history", {})}  # one from before "lr" was recorded lacks it

    def loop_state() -> dict:
        return {"step": step, "bad_steps": bad_steps, "history": history}

    micro_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * accelerator.num_processes))
    if micro_per_epoch < grad_accum:
        raise ModAdaptError(
            f"{len(train_set)} training examples make {micro_per_epoch} micro-batches per epoch, fewer than "
            f"grad_accum {grad_accum}; give more data or lower batch_size / grad_accum."
        )
    steps_per_epoch = micro_per_epoch // grad_accum
    checks = max_bad_steps is not None

    # Several processes: routers take their batch statistics (threshold-p's load) over the global batch.
    def statistics():
        if accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return statistics_over_processes(lambda t: accelerator.reduce(t, reduction="sum"))

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not (cfg.progress and accelerator.is_main_process))
    step_times: list[float] = []  # wall seconds per optimizer step of this process (the loss read syncs)
    last = time.perf_counter()
    while step < total_steps:
        epoch, done = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # the same order when resumed
        loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                train_set,
                batch_size=cfg.batch_size,
                shuffle=True,
                generator=generator,
                num_workers=num_workers,
                collate_fn=collate_fn,
            )
        )
        if done:
            loader = accelerator.skip_first_batches(loader, done * grad_accum)
        model.train()
        finite = True
        parts = dict.fromkeys(keys, 0.0)
        micro = 0
        for batch in loader:
            if micro == (steps_per_epoch - done) * grad_accum:
                break  # a partial accumulation at the epoch's end would not be a full step
            micro += 1
            if schedule is not None:
                schedule.apply(step)
            with accelerator.accumulate(model), accelerator.autocast(), statistics():
                loss, reported = loss_fn(model, batch, accelerator)
                for key, value in reported.items():
                    parts[key] += value / grad_accum
                parts["loss"] += float(loss.detach()) / grad_accum
                if checks:
                    finite = finite and bool(torch.isfinite(loss.detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if checks and accelerator.num_processes > 1:  # every process skips the step, or none
                        finite = mean_over_processes(accelerator, [float(finite)])[0] == 1.0
                    if schedule is not None:
                        schedule.hold_base(step, params)
                    if cfg.grad_clip or checks:
                        norm = accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
                        if checks and cfg.mixed_precision != "fp16" and norm is not None and not torch.isfinite(norm):
                            finite = False
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            if finite:
                lr = optimizer.param_groups[0]["lr"]  # what this step used (the first group's)
                scheduler.step()
                step += 1
                kept = (
                    [r["kept_fraction"] for r in routing_stats(converted) if r["kept_fraction"] is not None]
                    if converted is not None
                    else []
                )
                parts["kept_fraction"] = sum(kept) / len(kept) if kept else 1.0
                # What each process saw of the global batch (equal shares): averaged, so the
                # history is the global batch's with any number of processes.
                parts = dict(zip(parts, mean_over_processes(accelerator, list(parts.values()))))
                parts["lr"] = lr
                for key, value in parts.items():
                    history[key].append(value)
                shown = {"loss": f"{parts['loss']:.4f}"}
                if "aux_loss" in parts:
                    shown["aux"] = f"{parts['aux_loss']:.2e}"
                bar.update(1)
                bar.set_postfix(**shown, kept=f"{parts['kept_fraction']:.3f}")
                if (cfg.save_every and step % cfg.save_every == 0) or (
                    epoch_checkpoints and step % steps_per_epoch == 0
                ):
                    checkpoint.save(accelerator, loop_state())
            else:
                bad_steps += 1
                if bad_steps > max_bad_steps:
                    bar.close()
                    raise ModAdaptError(
                        f"{bad_steps} steps had a non-finite loss or gradient (limit max_bad_steps "
                        f"{max_bad_steps}); lower lr, raise grad_clip strictness, or use bf16 instead of fp16."
                    )
            finite = True
            parts = dict.fromkeys(keys, 0.0)
            checkpoint.check_stop(accelerator, loop_state())
            if step >= total_steps:
                break
    bar.close()
    if schedule is not None:
        schedule.finish()
    checkpoint.end(accelerator, loop_state())
    return LoopResult(model, step, bad_steps, history, step_times)


def train_epochs(cfg, model, train_set, loss_fn, checkpoint: RunCheckpoint, *, collate_fn=None, num_workers: int = 0):
    """`train_loop` as the image recipes set it up: every parameter trains with AdamW (warm-up +
    cosine, one scheduler step per optimizer step with any number of processes), accelerate
    prepares model, optimizer and scheduler, checkpoints also at each epoch end.

    `cfg` needs: mixed_precision, cpu, batch_size, epochs, max_steps, lr, weight_decay,
    warmup_steps, grad_clip, save_every, seed, progress. `loss_fn(model, batch, accelerator)`
    returns the training loss of a batch. Returns `(accelerator, prepared model, steps, losses)`.
    """
    import torch
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    # Random augmentation draws from Python's, numpy's and torch's generators: seed all three (a
    # resumed run gets them back from its checkpoint), differently on each process (the seed
    # plus its index: 0 alone), so that processes do not augment in lockstep.
    set_seed(cfg.seed, device_specific=True)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * accelerator.num_processes))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # The schedule counts optimizer steps (`total_steps` already divides the data by the
    # processes): one scheduler step per optimizer step. accelerate's default steps a prepared
    # scheduler once per process, which ended the cosine after 1/N of an N-process run.
    scheduler.split_batches = True
    inner = accelerator.unwrap_model(model)
    result = train_loop(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_set,
        lambda model, batch, accelerator: (loss_fn(model, batch, accelerator), {}),
        checkpoint,
        total_steps=total_steps,
        converted=inner if state_of(inner) is not None else None,
        epoch_checkpoints=True,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )
    return accelerator, result.model, result.step, result.history["loss"]
