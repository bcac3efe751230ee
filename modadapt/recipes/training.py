"""What every recipe's training loop shares: the run directory, its checkpoint, the LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..errors import ModAdaptError


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
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature**2


def lr_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (a LambdaLR factor)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class RunCheckpoint:
    """`OUT/checkpoint/`: accelerate's state (model, optimizer, scheduler, RNG) plus a small JSON of
    the loop's own state (step, ...), saved together so a resumed run continues exactly."""

    def __init__(self, output: str | Path, resume: bool):
        self.out = Path(output)
        self.dir = self.out / "checkpoint"
        self.state_file = self.dir / "trainer_state.json"
        if resume and not self.state_file.is_file():
            raise ModAdaptError(f"resume: {self.out} has no checkpoint to resume from.")
        if not resume and self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ModAdaptError(f"{self.out} exists and is not empty; choose a new output directory or pass --resume.")

    def load(self, accelerator) -> dict:
        accelerator.load_state(str(self.dir))
        return json.loads(self.state_file.read_text())

    def save(self, accelerator, state: dict) -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(self.dir))
        if accelerator.is_main_process:
            self.state_file.write_text(json.dumps(state))


def train_epochs(cfg, model, train_set, loss_fn, checkpoint: RunCheckpoint, *, collate_fn=None, num_workers: int = 0):
    """The epoch loop the image recipes share: AdamW with warm-up + cosine, accelerate (mixed
    precision, several processes), resumable mid-epoch with the same data order, checkpoints
    every `cfg.save_every` steps and at each epoch end, a progress bar.

    `cfg` needs: mixed_precision, cpu, batch_size, epochs, max_steps, lr, weight_decay,
    warmup_steps, grad_clip, save_every, seed, progress, resume. `loss_fn(model, batch, accelerator)`
    returns the training loss of a batch. Returns `(accelerator, prepared model, steps, losses)`.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * accelerator.num_processes))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = checkpoint.load(accelerator)["step"] if cfg.resume else 0

    losses: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (cfg.progress and accelerator.is_main_process))
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # same order when resumed
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
            num_workers=num_workers, collate_fn=collate_fn,
        ))
        if done_in_epoch:
            loader = accelerator.skip_first_batches(loader, done_in_epoch)
        model.train()
        for batch in loader:
            with accelerator.autocast():
                loss = loss_fn(model, batch, accelerator)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step % steps_per_epoch == 0:
                checkpoint.save(accelerator, {"step": step})
            if step >= total_steps:
                break
    bar.close()
    checkpoint.save(accelerator, {"step": step})
    return accelerator, model, step, losses
