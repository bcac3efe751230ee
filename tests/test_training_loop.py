"""The one training loop (`recipes.training.train_loop`) and the dense model on the same weights.

lm-adapt's numbers must not move when the loop or the baseline changes shape (the GPU benchmark's
records were made by them), so the recipe is checked against a plain PyTorch loop written out
here: the same data order, accumulation, clipping, schedule and distillation, with a deep-copied
teacher and dense baseline. Every loss and weight must be equal, not close.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SAMPLE_TEXT

import modadapt
from modadapt.recipes import lm_adapt
from modadapt.recipes.lm_adapt import LMAdaptConfig, evaluate, original, pack, run, select_trainable, tokenize
from modadapt.recipes.schedule import AdaptationSchedule
from modadapt.recipes.training import distillation_kl, lr_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16


def converted_model(seed: int = 0, router: str = "topk"):
    model = modadapt.build_preset("tiny-llama", seed=seed)
    torch.manual_seed(seed)
    modadapt.convert(model, router=router, capacity=0.5, layers="every-other")
    with torch.no_grad():  # routers with opinions, so that routing and the dense model differ
        generator = torch.Generator().manual_seed(seed)
        for layer in modadapt.mod_layers(model):
            for name, param in layer.router.named_parameters():
                if name.endswith("weight"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def blocks():
    ids = pack(tokenize(SAMPLE_TEXT, None, 256), SEQ, "sample")
    return ids[:14], ids[14:18]  # 14 blocks of 2: 7 micro-batches an epoch


def shuffled(train_blocks, batch_size, seed):
    """An epoch's micro-batches: a plain DataLoader shuffled by a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(train_blocks, batch_size=batch_size, shuffle=True, generator=generator)


def plain_loop(start, cfg, train_blocks):
    """lm-adapt's training, spelled out without accelerate: returns the losses and the model."""
    from accelerate.utils import set_seed

    teacher = modadapt.unload(copy.deepcopy(start)).eval().requires_grad_(False) if cfg.distill else None
    model = copy.deepcopy(start)
    set_seed(cfg.seed)
    trained = select_trainable(model, cfg)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps, cfg.max_steps))
    schedule = AdaptationSchedule(model, capacity_warmup=cfg.capacity_warmup, router_steps=cfg.router_steps)
    accum = cfg.grad_accum
    steps_per_epoch = -(-len(train_blocks) // cfg.batch_size) // accum  # a partial accumulation is dropped
    losses, step, epoch = [], 0, 0
    while step < cfg.max_steps:
        micro = list(shuffled(train_blocks, cfg.batch_size, cfg.seed + epoch))
        trained.train()
        for s in range(steps_per_epoch):
            total = 0.0
            for batch in micro[s * accum : (s + 1) * accum]:
                schedule.apply(step)
                out = trained(input_ids=batch, labels=batch, use_cache=False)
                loss = out.loss
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(input_ids=batch, use_cache=False).logits.float()
                    loss = loss + cfg.distill * distillation_kl(out.logits, target, cfg.distill_temperature)
                total += float(loss.detach()) / accum
                (loss / accum).backward()
            schedule.hold_base(step, params)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            losses.append(total)
            if step == cfg.max_steps:
                break
        epoch += 1
    schedule.finish()
    # then the cut-offs are set for the routing inference uses, on training blocks spread evenly
    n = min(cfg.calibrate_blocks, len(train_blocks))
    stride = (len(train_blocks) - 1) / max(n - 1, 1)
    spread = train_blocks[[round(i * stride) for i in range(n)]]
    modadapt.calibrate_cutoffs(model, spread.split(cfg.eval_batch_size))
    if cfg.train == "lora":
        trained.merge_and_unload()
    return losses, model


@pytest.mark.parametrize(
    "train, distill, grad_accum, capacity_warmup, router_steps",
    [
        ("routers", 1.0, 2, 3, 0),  # the teacher is the model itself under modadapt.dense
        ("lora", 0.5, 1, 0, 2),  # ... with peft's adapters off too
        ("all", 0.5, 3, 0, 1),  # the base trains: the teacher is the one frozen copy
    ],
)
def test_lm_adapt_equals_a_plain_loop(tmp_path, monkeypatch, train, distill, grad_accum, capacity_warmup, router_steps):
    if train == "lora":
        pytest.importorskip("peft")
    train_blocks, valid_blocks = blocks()
    cfg = LMAdaptConfig(
        data="given",
        output=str(tmp_path / "run"),
        seq_len=SEQ,
        batch_size=2,
        grad_accum=grad_accum,
        max_steps=5,
        lr=1e-2,
        train=train,
        distill=distill,
        distill_temperature=2.0,
        capacity_warmup=capacity_warmup,
        router_steps=router_steps,
        calibrate_blocks=4,  # of 14: spread, not the first four
        progress=False,
        cpu=True,
    )
    start = converted_model()
    expected_losses, expected = plain_loop(start, cfg, train_blocks)
    dense_ppl = evaluate(modadapt.unload(copy.deepcopy(start)), valid_blocks, batch_size=8)["ppl"]

    copies = []  # models the run copies (a call without a memo starts a copy; its parts recurse with one)
    deepcopy, given = copy.deepcopy, copy.deepcopy(start)

    def counting(x, *memo):
        if not memo and isinstance(x, torch.nn.Module):
            copies.append(type(x))
        return deepcopy(x, *memo)

    monkeypatch.setattr(lm_adapt.copy, "deepcopy", counting)
    summary = run(cfg, model=given, blocks=(train_blocks, valid_blocks))
    monkeypatch.undo()

    assert summary["steps"] == 5 and summary["history"]["loss"] == expected_losses
    assert len(copies) == (1 if train == "all" else 0)  # one frozen teacher at most, never a second copy
    assert summary["valid_ppl"]["dense"] == dense_ppl
    adapted = modadapt.load(tmp_path / "run" / "model").state_dict()
    for name, value in expected.state_dict().items():
        assert torch.equal(adapted[name], value), name


def test_accumulation_sees_each_block_once_per_epoch_in_the_seeded_order(tmp_path, monkeypatch):
    """3 micro-batches of 2 a step over 14 blocks: 2 steps an epoch, the 7th micro-batch dropped."""
    train_blocks, valid_blocks = blocks()
    seen = []
    model = converted_model()
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].clone()) if m.training else None, with_kwargs=True
    )
    cfg = LMAdaptConfig(
        data="given",
        output=str(tmp_path / "run"),
        seq_len=SEQ,
        batch_size=2,
        grad_accum=3,
        max_steps=3,
        progress=False,
        cpu=True,
    )
    run(cfg, model=model, blocks=(train_blocks, valid_blocks))
    expected = []
    for epoch in (0, 1):
        expected += list(shuffled(train_blocks, 2, cfg.seed + epoch))[:6]
    assert len(seen) == 9 and all(torch.equal(a, b) for a, b in zip(seen, expected[:9]))


@pytest.mark.parametrize("train", ["routers", "lora"])
def test_teacher_under_dense_equals_the_deep_copy(train):
    """With the base weights frozen, the model itself under `original` is the dense model the run
    started from, after training steps moved its routers (and LoRA adapters), in train mode with
    dropout on: the teacher's logits equal those of a deep copy taken before training."""
    if train == "lora":
        pytest.importorskip("peft")
    model = converted_model()
    copy_teacher = modadapt.unload(copy.deepcopy(model)).eval()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5  # train mode would drop: the teacher must run in eval mode
    cfg = LMAdaptConfig(data="given", output="unused", train=train, lora_rank=2)
    trained = select_trainable(model, cfg)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-1)
    train_blocks, _ = blocks()
    trained.train()
    for batch in train_blocks.split(4)[:2]:
        trained(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = train_blocks[:4]
    with torch.no_grad():
        with original(model, trained):
            assert not model.training
            inside = model(input_ids=batch, use_cache=False).logits
        expected = copy_teacher(input_ids=batch, use_cache=False).logits
        routed = model.eval()(input_ids=batch, use_cache=False).logits
    assert torch.equal(inside, expected)
    assert not torch.equal(routed, expected)  # the routers (and adapters) did move
    model.train()
    with original(model, trained):
        pass
    assert model.training and all(p.requires_grad for p in params)  # back to training, adapters on
