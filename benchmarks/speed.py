"""Dense vs Mixture-of-Depths speed on one GPU: prefill, decode, training step, memory, KV bytes.

A Llama-architecture model (~1.1B parameters, random weights, bf16, SDPA) is built from a config;
each MoD variant is a deep copy of it converted with `modadapt.convert`, so dense and MoD share
weights, dtype, attention kernel and process. Every scenario times dense and MoD with the same
warm-up, the same CUDA-event timing and the median over the same number of repeats, and reports
the measured speedup next to the ideal one (FLOPs for prefill/training, bytes for decode).

    python benchmarks/speed.py --tiny                   # CPU smoke test, seconds
    python benchmarks/speed.py --out results.json       # GPU (see benchmarks/README.md)
    python benchmarks/speed.py --compile --scenarios prefill,train --routers topk --out compiled.json
    python benchmarks/speed.py --scenarios decode_speculative --speculate-k 2,4,6 --draft routers --draft margin=0.5
    python benchmarks/speed.py --scenarios decode_kv_budget --routers topk,threshold-p --kv-budget-gib 60
    python benchmarks/speed.py --scenarios decode_graphs --routers topk,threshold-p --graph-compile --out fused.json
    python benchmarks/speed.py --scenarios decode_branches --routers topk,threshold-p --out branches.json

With --compile, prefill and training run dense and MoD alike through torch.compile (fullgraph for
dense and topk); decode and the layer breakdown stay eager. With --graph-compile, decode_graphs and
decode_speculative build `GraphedDecoder(..., compile=True)`: the layers of the captured step
through torch.compile (inductor), so its small kernels fuse.

Router weights: a fresh conversion has zero routers (every token kept), so the script gives each
MoD layer's router a random score direction and a bias at the right quantile of the scores on a
calibration batch, layer by layer: `topk` keeps 12.5% under its causal (decode) rule, `threshold-p`
about half. `topk` prefill/training uses the static top-k selection (`inference_routing="topk"`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import gzip
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import modadapt
from modadapt import varlen
from modadapt.adapters.hf.versions import cache_kwarg, returned_cache
from modadapt.config import pack_reserve_value
from modadapt.decoding import BRANCHES
from modadapt.masks import subset_attention_mask
from modadapt.metrics.flops import processing_flops, sequence_flops
from modadapt.mod_layer import can_pack
from modadapt.routers.base import RoutingContext, kept_count

# --------------------------------------------------------------------------------------------
# Sizes. Goals are the issue's (measured speedup >= goal); the tiny size keeps them for the table.
# --------------------------------------------------------------------------------------------

FULL = dict(
    model=dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
        max_position_embeddings=34816,
    ),
    prefill=[
        dict(batch=1, seq=4096, goals={"topk": 1.6}),
        dict(batch=8, seq=2048, goals={"topk": 1.6, "threshold-p": 1.25}),
    ],
    # decode_graphs sweeps these (the decode-at-batch goals); the eager `decode` takes the first two
    decode=[
        dict(batch=1, context=2048, new=128, goals={"threshold-p": 1.25, "topk": 1.6}),
        dict(batch=32, context=2048, new=128, goals={"threshold-p": 1.15, "topk": 1.25}),
        dict(batch=128, context=2048, new=128, goals={}),
        dict(batch=1, context=32768, new=128, goals={}),
        dict(batch=8, context=32768, new=128, goals={"threshold-p": 1.3, "topk": 1.5}),
    ],
    eager_decode=2,
    # decode_branches: every branch mode where they differ (batch: rows that skip), to decide `auto`
    branches=[
        dict(batch=32, context=2048, new=128),
        dict(batch=128, context=2048, new=128),
        dict(batch=8, context=32768, new=128),
    ],
    # decode_kv_budget: the largest batch whose static K/V fits `budget_gib`, per model, and its tokens/s
    kv_budget=dict(context=32768, new=128, budget_gib=60, probe_batch=4, prefill_rows=4, goals={"topk": 1.5}),
    train=dict(batch=8, seq=2048, goals={"topk": 1.5}),
    layer=dict(batch=8, seq=2048),
    calibration=dict(batch=2, seq=1024),
    speculate=[dict(batch=1, context=2048, new=128, prompts=8), dict(batch=8, context=2048, new=128)],
    speculate_k=(2, 4, 6),
    warmup=3,
    repeats=10,
    decode_warmup=1,
    decode_repeats=3,
    decode_fresh_repeats=2,
    train_warmup=2,
    train_repeats=5,
)
TINY = dict(
    model=dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=512,
    ),
    prefill=[
        dict(batch=1, seq=128, goals={"topk": 1.6}),
        dict(batch=4, seq=64, goals={"topk": 1.6, "threshold-p": 1.25}),
    ],
    decode=[
        dict(batch=1, context=64, new=8, goals={"threshold-p": 1.25, "topk": 1.6}),
        dict(batch=4, context=64, new=8, goals={"threshold-p": 1.15, "topk": 1.25}),
    ],
    eager_decode=2,
    branches=[dict(batch=4, context=64, new=8), dict(batch=8, context=64, new=8)],
    # 256 tokens: a dense layer's capacity (384) is above a sparse MoD layer's (one 128-slot bucket);
    # 1 MiB holds 5 dense rows of this model, 8 of topk's
    kv_budget=dict(context=256, new=8, budget_gib=2**-10, probe_batch=2, prefill_rows=2, goals={"topk": 1.5}),
    train=dict(batch=4, seq=64, goals={"topk": 1.5}),
    layer=dict(batch=4, seq=64),
    calibration=dict(batch=2, seq=64),
    speculate=[dict(batch=1, context=64, new=8, prompts=2), dict(batch=2, context=64, new=8)],
    speculate_k=(2,),
    warmup=1,
    repeats=3,
    decode_warmup=1,
    decode_repeats=2,
    decode_fresh_repeats=1,
    train_warmup=1,
    train_repeats=2,
)
ROUTERS = {
    # name: (convert kwargs, kept fraction the router is calibrated to under its causal rule)
    "topk": (dict(router="topk", capacity=0.125, layers="every-other", inference_routing="topk"), 0.125),
    "threshold-p": (dict(router="threshold-p", layers="every-other"), 0.5),
    # The same routers (same calibration seed), each row padded to the widest instead of packed.
    "threshold-p-padded": (dict(router="threshold-p", layers="every-other", packing="padded"), 0.5),
}
KV_GOAL = {"threshold-p": 0.8}  # mod_kv_bytes / dense_kv_bytes at most this
ROUTER_OVERHEAD_GOAL = 0.05  # route() time / dense layer time at most this
SCENARIOS = (
    "check",
    "prefill",
    "layer",
    "decode_layer",
    "decode",
    "decode_graphs",
    "decode_branches",
    "decode_kv_budget",
    "decode_speculative",
    "train",
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU (host gaps between launches count, as they do for a user), else
    perf_counter. `time(fn)` returns milliseconds of one call. Beside it, `host_ms` keeps how long
    the host took to return from the last call and `host_median` the median of the last `median`:
    a host time close to the event time means the host, not the GPU, sets the pace."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_ms = 0.0
        self.host_median = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            self.host_ms = (time.perf_counter() - t0) * 1e3
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        self.host_ms = (time.perf_counter() - t0) * 1e3
        return self.host_ms

    def median(self, fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
        for _ in range(warmup):
            fn()
        times, hosts = [], []
        for _ in range(repeats):
            times.append(self.time(fn))
            hosts.append(self.host_ms)
        self.host_median = statistics.median(hosts)
        return statistics.median(times), times


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second a device-to-device copy moves (read + written), the median of five: what
    a decode step that only streams its weights and K/V could reach."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock = Clock(device)
    ms, _ = clock.median(lambda: dst.copy_(src), warmup=2, repeats=5)
    return 2 * src.numel() / (ms / 1e3)


def hf_static_step_ms(model: torch.nn.Module, ids: torch.Tensor, new: int, clock: Clock) -> float:
    """ms per decode step of transformers' own static-cache `generate` (compiled decode on CUDA,
    greedy): what a user would pick instead of GraphedDecoder. The prefill is taken out by timing
    `new` and 1 new tokens."""
    mask = torch.ones_like(ids)

    def gen(n):
        return lambda: model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    gen(new)()  # warm-up: captures / compiles the static decode
    full = statistics.median(clock.time(gen(new)) for _ in range(2))
    first = statistics.median(clock.time(gen(1)) for _ in range(2))
    return (full - first) / (new - 1)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, key: str):
    """Peak memory allocated above what was resident when the block started (bytes)."""
    if device.type != "cuda":
        into[key] = None
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    into[key] = torch.cuda.max_memory_allocated() - base


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_dense(model_cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


class _Captured(Exception):
    pass


def _layer_inputs(model, layer, ids) -> tuple[tuple, dict]:
    """The (args, kwargs) the model passes to `layer` for `ids` (the forward stops there)."""
    got = {}

    def hook(module, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        handle.remove()
    return got["args"], got["kwargs"]


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def calibrate(model, keep_fraction: float, ids: torch.Tensor, seed: int) -> list[float]:
    """Give each MoD layer's router a random score direction and a bias so that its causal rule
    (score >= threshold: 0 for `topk`, logit(p) for `threshold-p`) keeps `keep_fraction` of the
    calibration tokens. Layer by layer, so each layer sees the routing of the layers before it.
    Returns the kept fraction each layer reaches on the calibration batch after bf16 rounding."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    reached = []
    for layer in modadapt.mod_layers(model):
        hidden = _hidden_of(*_layer_inputs(model, layer, ids)).float()
        scorer = layer.router.scorer
        threshold = float(getattr(layer.router, "logit_p", 0.0))
        D = hidden.shape[-1]
        direction = torch.randn(1, D, generator=gen) / math.sqrt(D)
        scorer.weight.copy_(direction.to(scorer.weight.dtype))
        scores = F.linear(hidden, scorer.weight.float()).flatten()
        scorer.bias.fill_(threshold - torch.quantile(scores, 1.0 - keep_fraction).item())
        reached.append(float(((scores + scorer.bias.float()) >= threshold).float().mean()))
    return reached


def make_mod(
    dense,
    router: str,
    calib_ids: torch.Tensor,
    seed: int,
    pack_bucket: int | None = None,
    pack_reserve: float | str | None = None,
):
    kwargs, fraction = ROUTERS[router]
    model = modadapt.convert(copy.deepcopy(dense), **kwargs, pack_bucket=pack_bucket, pack_reserve=pack_reserve)
    reached = calibrate(model, fraction, calib_ids, seed)
    return model, fraction, reached


# --------------------------------------------------------------------------------------------
# Ideal speedups
# --------------------------------------------------------------------------------------------


@dataclass
class Shape:
    D: int
    I: int
    V: int
    L: int
    kv: int  # num_key_value_heads * head_dim
    mod_layers: list[int]
    layer_params: int
    head_params: int  # final norm + lm_head (read every decode step)

    @classmethod
    def of(cls, model) -> Shape:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        layers = model.model.layers
        return cls(
            D=c.hidden_size,
            I=c.intermediate_size,
            V=c.vocab_size,
            L=c.num_hidden_layers,
            kv=c.num_key_value_heads * head_dim,
            mod_layers=[],
            layer_params=sum(p.numel() for p in layers[0].parameters()),
            head_params=sum(p.numel() for p in model.lm_head.parameters())
            + sum(p.numel() for p in model.model.norm.parameters()),
        )


def shape_table(s: Shape) -> dict:
    """`modadapt.metrics.flops`'s table for a model of this shape: one counting model for every
    FLOPs figure (attention as the whole square, as the library and the flop counter count it)."""
    weights = s.D * (2 * s.D + 2 * s.kv) + 3 * s.D * s.I
    layers = [{"weights": weights, "width": s.D, "router": s.D if i in s.mod_layers else None} for i in range(s.L)]
    return {"layers": layers, "head": s.V * s.D}


def layer_flops(s: Shape, B: int, T: int, kept: float = 1.0) -> float:
    """Forward FLOPs of one decoder layer on B rows of T tokens, `kept` of them processed."""
    row = shape_table(s)["layers"][0]
    return B * processing_flops(kept_count(kept, T), row["weights"], row["width"])


def model_flops(s: Shape, B: int, T: int, kept: float | None, logits_tokens: int) -> float:
    """Forward FLOPs of B rows of T tokens, MoD layers keeping `kept` (None: dense), the head
    scoring `logits_tokens` of each row."""
    mod = None if kept is None else {i: kept_count(kept, T) for i in s.mod_layers}
    return B * sequence_flops(shape_table(s), T, mod, head_tokens=logits_tokens)


def decode_bytes(s: Shape, B: int, context: int, new: int, kept: float | None, elt: int) -> float:
    """Bytes read over `new` decode steps: weights of every layer run plus the K/V it attends.
    The MoD ideal is per-row: a MoD layer's weights are read when any row keeps the token
    (probability 1 - (1 - f)^B), and only rows that keep read their cache, which holds f of the
    tokens (so K/V read at MoD layers scales with f^2)."""
    total = 0.0
    for step in range(new):
        ctx = context + step
        total += s.head_params * elt + B * s.D * elt  # lm head + norm, embedding rows
        for i in range(s.L):
            kv_read = B * ctx * s.kv * 2 * elt
            if kept is not None and i in s.mod_layers:
                total += (1 - (1 - kept) ** B) * s.layer_params * elt + kept * kept * kv_read
            else:
                total += s.layer_params * elt + kv_read
    return total


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    size: dict
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    dense: torch.nn.Module
    mods: dict  # router -> (model, nominal fraction, calibration fractions)
    shape: Shape
    env: dict
    records: list = field(default_factory=list)
    compiled: dict = field(default_factory=dict)  # id(model) -> torch.compile wrapper (--compile)
    compile_s: dict = field(default_factory=dict)  # (model name, case) -> seconds of the compiling call

    def fast(self, model):
        """The model to run in prefill and training: its compiled wrapper under --compile."""
        return self.compiled.get(id(model), model)

    def is_compiled(self, model) -> bool:
        return id(model) in self.compiled

    def first_call(self, model, fn, name: str, case: str) -> float | None:
        """Under --compile, make the first (compiling) call of `fn` outside the timings and return
        its seconds; else do nothing (None). Recompiles per shape, grad mode and train/eval."""
        if not self.is_compiled(model):
            return None
        self.clock.sync()
        t0 = time.perf_counter()
        fn()
        self.clock.sync()
        seconds = time.perf_counter() - t0
        self.compile_s[(name, case)] = seconds
        print(f"# compile {case:>18s} {name:>12s}: first call {seconds:6.1f} s", flush=True)
        return seconds

    def settle(self, model, fn, rounds: int, name: str, case: str) -> tuple[int, float]:
        """With `pack_reserve`, the calls before the timed ones until the reserves hold
        (`settle_reserves`), outside the timings; (calls, seconds), printed where any ran."""
        state = model._modadapt_state
        if state.config.pack_reserve is None:
            return 0, 0.0
        self.clock.sync()
        t0 = time.perf_counter()
        calls = settle_reserves(state, fn, rounds)
        self.clock.sync()
        seconds = time.perf_counter() - t0
        print(f"# settle  {case:>18s} {name:>12s}: {calls} calls, {seconds:6.1f} s", flush=True)
        return calls, seconds

    def ids(self, B: int, T: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randint(0, self.shape.V, (B, T), generator=gen).to(self.device)

    def add(self, record: dict) -> None:
        # the record's own fields win: a scenario on another model (--speculate-model) names it
        record = {"dense_compiled": False, "mod_compiled": False, **self.env, **record}
        self.records.append(record)
        if "dense_ms" in record:
            print(format_row(record), flush=True)
        if self.args.out:
            write_json(self.args.out, self.records)


def compile_fields(b: Bench, model, dense_compile_s, mod_compile_s) -> dict:
    """Record fields saying how dense and MoD ran (eager or compiled) and what compiling cost."""
    return dict(
        dense_compiled=b.is_compiled(b.dense),
        mod_compiled=b.is_compiled(model),
        dense_compile_s=dense_compile_s,
        mod_compile_s=mod_compile_s,
    )


def error_text(error: BaseException, limit: int = 300) -> str:
    """An error as a record keeps it: its type and the start of its first line (a result, not a crash)."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__


def add_failure(b: Bench, label: str, record: dict, error: BaseException) -> None:
    """One failing cell is a result and the sweep goes on: the traceback to the log, `record` with the error."""
    traceback.print_exc()
    message = error_text(error)
    print(f"# {label}: FAILED {message}", flush=True)
    b.add(dict(record, error=message))


def decode_speed_fields(B: int, new: int, dense_ms: float, mod_ms: float, ideal_speedup: float) -> dict:
    """Record fields of dense and MoD each decoding `new` tokens a row at batch `B` (ideal by bytes),
    named alike in every decode scenario so that their rows compare."""
    return dict(
        dense_ms=dense_ms,
        mod_ms=mod_ms,
        speedup=dense_ms / mod_ms,
        ideal_speedup=ideal_speedup,
        ideal_basis="bytes",
        dense_ms_per_step=dense_ms / new,
        mod_ms_per_step=mod_ms / new,
        dense_tokens_per_s=B * new / dense_ms * 1e3,
        mod_tokens_per_s=B * new / mod_ms * 1e3,
    )


def graph_fields(b: Bench) -> dict:
    """Record fields saying how a `GraphedDecoder` ran: compiled layers, and whether flash decode attention ran."""
    from modadapt.decoding import decode_linear, static_cache

    return dict(
        graph_compile=b.args.graph_compile,
        decode_kernel=static_cache.DECODE_KERNEL,
        linear_kernel=decode_linear.LINEAR_KERNEL,
        flash_decode=any(static_cache._FLASH.values()),
    )


def mean_kept(model) -> float | None:
    fractions = [r["kept_fraction"] for r in modadapt.routing_stats(model) if r["kept_fraction"] is not None]
    return sum(fractions) / len(fractions) if fractions else None


def settle_reserves(state, fn, rounds: int) -> int:
    """Call `fn` until `rounds` calls in a row ran without an exact rerun (`state.pack_reruns`), at
    most `4 * rounds` calls; returns how many ran. `pack_reserve="auto"` learns each layer's share
    from the calls (an overflowing forward teaches only the layers up to the one that overflowed)
    and under --compile each new reserve compiles: timed from the first call, a compiled batch-1
    prefill's median was its compiles (H200, 2026-12-04: 0.03x, 1.35x once settled)."""
    calls = clean = 0
    while clean < rounds and calls < 4 * rounds:
        before = state.pack_reruns
        fn()
        calls += 1
        clean = clean + 1 if state.pack_reruns == before else 0
    return calls


def run_prefill(b: Bench) -> None:
    for setting in b.size["prefill"]:
        B, T = setting["batch"], setting["seq"]
        inputs = [b.ids(B, T, seed) for seed in range(3)]
        turn = {"i": 0}

        def make(model):
            def fn():
                turn["i"] += 1
                with torch.inference_mode():
                    model(input_ids=inputs[turn["i"] % len(inputs)], use_cache=False, logits_to_keep=1)

            return fn

        case = f"prefill_b{B}_s{T}"
        mem: dict = {}
        dense_compile = b.first_call(b.dense, make(b.fast(b.dense)), "dense", case)
        with peak_memory(b.device, mem, "dense"):
            dense_ms, dense_all = b.clock.median(make(b.fast(b.dense)), b.size["warmup"], b.size["repeats"])
        dense_host = b.clock.host_median
        dense_flops = model_flops(b.shape, B, T, None, 1)
        for router, (model, _nominal, _) in b.mods.items():
            mod_compile = b.first_call(model, make(b.fast(model)), router, case)
            settle_calls, settle_s = b.settle(model, make(b.fast(model)), len(inputs), router, case)
            reruns = model._modadapt_state.pack_reruns
            with peak_memory(b.device, mem, "mod"):
                mod_ms, mod_all = b.clock.median(make(b.fast(model)), b.size["warmup"], b.size["repeats"])
            mod_host = b.clock.host_median
            reruns = model._modadapt_state.pack_reruns - reruns
            kept = mean_kept(model)
            goal = setting["goals"].get(router)
            b.add(
                dict(
                    scenario=f"prefill_b{B}_s{T}",
                    router=router,
                    batch=B,
                    seq=T,
                    dense_ms=dense_ms,
                    mod_ms=mod_ms,
                    speedup=dense_ms / mod_ms,
                    ideal_speedup=dense_flops / model_flops(b.shape, B, T, kept, 1),
                    ideal_basis="flops",
                    kept_fraction=kept,
                    goal=goal,
                    met=None if goal is None else dense_ms / mod_ms >= goal,
                    dense_host_ms=dense_host,
                    mod_host_ms=mod_host,
                    pack_reruns=reruns,
                    settle_calls=settle_calls,
                    settle_s=settle_s,
                    dense_peak_bytes=mem["dense"],
                    mod_peak_bytes=mem["mod"],
                    dense_times_ms=dense_all,
                    mod_times_ms=mod_all,
                    **compile_fields(b, model, dense_compile, mod_compile),
                )
            )


def run_layer(b: Bench) -> None:
    """One layer at the prefill shape: dense layer vs MoD layer, and inside the MoD layer the
    router's route(), the mask build and the original layer on the kept subset (what is left is
    gathers, scatter, gate arithmetic and Python)."""
    B, T = b.size["layer"]["batch"], b.size["layer"]["seq"]
    ids = b.ids(B, T, 7)
    index = b.shape.mod_layers[0]
    dense_layer = b.dense.model.layers[index]
    args, kwargs = _layer_inputs(b.dense, dense_layer, ids)
    hidden = _hidden_of(args, kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    warm, reps = b.size["warmup"], b.size["repeats"]

    def dense_fn():
        with torch.inference_mode():
            dense_layer(*args, **kwargs)

    dense_ms, _ = b.clock.median(dense_fn, warm, reps)
    dense_host = b.clock.host_median
    for router, (model, _, _) in b.mods.items():
        layer = model.model.layers[index]
        state = layer.mod_state
        causal = not model.training and state.model.config.inference_routing == "causal"
        ctx = RoutingContext(
            layer_index=index,
            real=None,
            forced=None,
            positions=torch.arange(T, device=b.device).expand(B, T),
            causal=causal,
            training=False,
            pack=can_pack(layer, hidden, None, T, causal),
        )

        def mod_fn():
            with torch.inference_mode():
                layer(*args, **kwargs)

        def route_fn():
            with torch.inference_mode():
                layer.router.route(hidden, ctx)

        with torch.inference_mode():
            decision = layer.router.route(hidden, ctx)
            packed = decision.segments is not None
            idx = decision.indices  # packed: [1, N] over the flattened [B * T] tokens
            rows = 1 if packed else B

            def tokens(t):
                t = t.expand(B, *t.shape[1:])
                t = t.reshape(1, B * T, *t.shape[2:]) if packed else t
                return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(*idx.shape, *t.shape[2:]))

            K = idx.shape[1]
            sub = tokens(hidden)
            pe = tuple(tokens(t) for t in rest["position_embeddings"])
            pos = tokens(rest["position_ids"])
            extra = {varlen.SEGMENTS_KWARG: decision.segments, varlen.MAX_LEN_KWARG: (T, T)} if packed else {}

        def mask_fn():
            if packed:  # no mask: the segments are the mask
                return None
            with torch.inference_mode():
                return subset_attention_mask(
                    "sdpa",
                    query_index=idx,
                    query_valid=decision.valid,
                    past_index=None,
                    past_valid=None,
                    causal=True,
                    window=None,
                    span=T,
                    dtype=hidden.dtype,
                )

        mask = mask_fn()

        def inner_fn():
            with torch.inference_mode(), state.call.packed_attention() if packed else contextlib.nullcontext():
                layer._mod_original.forward(
                    layer, sub, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=False, **extra
                )

        mod_ms, _ = b.clock.median(mod_fn, warm, reps)
        mod_host = b.clock.host_median
        route_ms, _ = b.clock.median(route_fn, warm, reps)
        route_host = b.clock.host_median
        mask_ms, _ = b.clock.median(mask_fn, warm, reps)
        inner_ms, _ = b.clock.median(inner_fn, warm, reps)
        kept = float(decision.keep.float().mean())
        overhead = route_ms / dense_ms
        b.add(
            dict(
                scenario=f"layer_b{B}_s{T}",
                router=router,
                batch=B,
                seq=T,
                layer=index,
                dense_ms=dense_ms,
                mod_ms=mod_ms,
                speedup=dense_ms / mod_ms,
                ideal_speedup=layer_flops(b.shape, B, T) / (layer_flops(b.shape, B, T, kept) + 2 * B * T * b.shape.D),
                ideal_basis="flops",
                kept_fraction=kept,
                slots=K,
                masked=mask is not None,
                packed=packed,
                rows=rows,
                route_ms=route_ms,
                mask_ms=mask_ms,
                subset_layer_ms=inner_ms,
                other_ms=mod_ms - route_ms - mask_ms - inner_ms,
                dense_host_ms=dense_host,
                mod_host_ms=mod_host,
                route_host_ms=route_host,
                router_overhead=overhead,
                goal=ROUTER_OVERHEAD_GOAL,
                goal_kind="router_overhead<=",
                met=overhead <= ROUTER_OVERHEAD_GOAL,
            )
        )


def check_varlen_kernel(device, dtype) -> dict:
    """`modadapt.varlen.varlen_attention` (the flash kernel where available) against its per-segment
    SDPA reference on random grouped-query inputs shaped like a packed prefill (causal, equal query
    and key segments) and like a packed decode step (0 or 1 query per row, long key segments)."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    H, Hk, d = 32, 8, 64
    out = {}
    for case, q_lens, k_lens, causal in (
        ("prefill", [700, 1, 2048, 333], [700, 1, 2048, 333], True),
        ("decode", [1, 0, 1, 1, 0], [900, 17, 1500, 1, 40], False),
        ("decode_head_major", [1, 0, 1, 1, 0], [900, 17, 1500, 1, 40], False),
    ):
        q = torch.randn(sum(q_lens), H, d, generator=gen).to(device, dtype)
        k, v = (torch.randn(sum(k_lens), Hk, d, generator=gen).to(device, dtype) for _ in range(2))
        if case.endswith("head_major"):  # [Hk, N, d] storage seen as [N, Hk, d], as a cache may hold it
            k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v))
        q_seg, k_seg = (torch.tensor([0, *itertools.accumulate(x)], device=device) for x in (q_lens, k_lens))
        got = varlen.varlen_attention(q, k, v, q_seg, k_seg, max(q_lens), max(k_lens), scale=None, causal=causal)
        ref = varlen._reference(q, k, v, q_seg, k_seg, scale=None, causal=causal, dropout=0.0)
        out[f"{case}_rel_diff"] = float((got.float() - ref.float()).norm() / ref.float().norm())
    out["flash_varlen"] = varlen.has_fast_kernel(q)
    return out


def decode_and_forward(model, ids: torch.Tensor, T: int):
    """Logits of 4 rows at the last prompt position and 16 teacher-forced decode steps after a
    cached prefill, the same positions from one forward without a cache, and the cache."""
    prompt = min(256, T - 16)
    layers = modadapt.mod_layers(model) if hasattr(model, "_modadapt_state") else []
    with torch.inference_mode():
        out = model(input_ids=ids[:4, :prompt], use_cache=True)
        steps, keeps = [out.logits[:, -1:].float()], []
        for t in range(prompt, prompt + 16):
            out = model(input_ids=ids[:4, t : t + 1], **cache_kwarg(model, returned_cache(out)), use_cache=True)
            steps.append(out.logits.float())
            keeps.append([m.mod_state.last_keep for m in layers])
        full = model(input_ids=ids[:4, : prompt + 16], use_cache=False).logits[:, prompt - 1 :].float()
    flips = sum(
        int((torch.cat([k[i] for k in keeps], 1) != m.mod_state.last_keep[:, prompt:]).sum())
        for i, m in enumerate(layers)
    )
    model.mod_check_flips = flips  # decisions at the decode positions that differ from the forward's
    return torch.cat(steps, 1), full, returned_cache(out)


def run_packed_check(b: Bench) -> None:
    """The packed (flash varlen) path against the padded one, on the same inputs.

    Per layer (the first MoD layer on its real B=8 prefill inputs): both layouts make the same
    decisions, so outputs and gradients (w.r.t. the input and the router) may differ only by
    kernel rounding. Whole model: bf16 rounding may flip a token near the threshold in a later
    layer, so those differences also include routing flips (the share of equal decisions says
    how many)."""
    setting = b.size["prefill"][-1]
    B, T = setting["batch"], setting["seq"]
    kernel = check_varlen_kernel(b.device, b.dtype)
    b.add(dict(scenario="varlen_kernel_check", router=None, **kernel))
    print(f"# varlen kernel vs per-segment SDPA: {kernel}", flush=True)
    ids = b.ids(B, T, 31)
    for router, (model, _, _) in b.mods.items():
        config = model._modadapt_state.config
        if config.packing == "padded" or not ROUTERS[router][0]["router"].startswith("threshold"):
            continue
        layer = modadapt.mod_layers(model)[0]
        args, kwargs = _layer_inputs(model, layer, ids)
        hidden = _hidden_of(args, kwargs).clone()
        rest = {
            k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone() if torch.is_tensor(v) else v)
            for k, v in kwargs.items()
            if k != "hidden_states"
        }
        probe = torch.randn(hidden.shape, generator=torch.Generator(device="cpu").manual_seed(5)).to(hidden)
        layer_out, layer_grads, outs, keeps, decoded, full, layouts, flips = {}, {}, {}, {}, {}, {}, {}, {}
        for packing in ("packed", "padded"):
            config.packing = packing
            x = hidden.detach().requires_grad_(True)
            y = layer(x, **rest)
            y = y[0] if isinstance(y, tuple) else y
            (y.float() * probe.float()).sum().backward()
            layer_out[packing] = y.detach().float()
            layer_grads[packing] = torch.cat(
                [x.grad.float().flatten()] + [p.grad.float().flatten() for p in layer.router.parameters()]
            )
            layer.zero_grad(set_to_none=True)
            with torch.inference_mode():
                outs[packing] = model.model(input_ids=ids, use_cache=False).last_hidden_state.float()
            keeps[packing] = [m.mod_state.last_keep.clone() for m in modadapt.mod_layers(model)]
            decoded[packing], full[packing], cache = decode_and_forward(model, ids, T)
            layouts[packing] = [
                cache.layers[m.mod_state.index].mod_segments is not None for m in modadapt.mod_layers(model)
            ]
            flips[packing] = model.mod_check_flips
        config.packing = "auto"

        def rel(a, c):
            return float((a - c).norm() / c.norm().clamp_min(1e-30))

        same = sum(int((a == c).sum()) for a, c in zip(keeps["packed"], keeps["padded"]))
        record = dict(
            scenario=f"packed_check_b{B}_s{T}",
            router=router,
            batch=B,
            seq=T,
            flash_varlen=varlen.has_fast_kernel(hidden),
            layer_max_abs_diff=float((layer_out["packed"] - layer_out["padded"]).abs().max()),
            layer_max_abs_value=float(layer_out["padded"].abs().max()),
            layer_rel_diff=rel(layer_out["packed"], layer_out["padded"]),
            layer_grad_rel_diff=rel(layer_grads["packed"], layer_grads["padded"]),
            model_rel_diff=rel(outs["packed"], outs["padded"]),
            model_equal_decisions=same / sum(k.numel() for k in keeps["packed"]),
            decode_logits_rel_diff=rel(decoded["packed"], decoded["padded"]),
            decode_same_argmax=float((decoded["packed"].argmax(-1) == decoded["padded"].argmax(-1)).float().mean()),
            decode_vs_forward_rel_diff={
                "packed": rel(decoded["packed"], full["packed"]),
                "padded": rel(decoded["padded"], full["padded"]),
                "dense": rel(*decode_and_forward(b.dense, ids, T)[:2]),
            },
            decode_decisions_flipped=flips,  # of 4 rows x 16 positions x MoD layers
            decode_cache_packed_layers=sum(layouts["packed"]),
        )
        b.add(record)
        print(
            f"# packed vs padded ({router}), flash varlen {record['flash_varlen']}: one layer: max |diff| "
            f"{record['layer_max_abs_diff']:.4g} (max |value| {record['layer_max_abs_value']:.3g}), relative "
            f"{record['layer_rel_diff']:.3g}, gradients relative {record['layer_grad_rel_diff']:.3g}; whole model: "
            f"relative {record['model_rel_diff']:.3g}, equal decisions {record['model_equal_decisions']:.4f}; "
            f"cached prefill + 16 decode steps (B=4): logits relative {record['decode_logits_rel_diff']:.3g}, "
            f"same argmax {record['decode_same_argmax']:.3f}, packed cache layers {record['decode_cache_packed_layers']}; "
            f"decode vs forward without cache, relative: {record['decode_vs_forward_rel_diff']}, "
            f"decisions flipped {flips}",
            flush=True,
        )


def forced_routing(model, measure) -> dict:
    """`{"skip": measure(), "keep": measure()}` with every router of `model` forced to skip (bias
    -1e4), then to keep (+1e4); the biases are put back after. Changed in place, so a
    `GraphedDecoder` sees the change (its next prefill captures afresh)."""
    biases = [layer.router.scorer.bias for layer in modadapt.mod_layers(model)]
    saved = [bias.detach().clone() for bias in biases]
    forced = {}
    try:
        for case, value in (("skip", -1e4), ("keep", 1e4)):
            with torch.no_grad():
                for bias in biases:
                    bias.fill_(value)
            forced[case] = measure()
    finally:
        with torch.no_grad():
            for bias, value in zip(biases, saved):
                bias.copy_(value)
    return forced


def mod_layer_price(dense_step_ms: float, forced: dict, mod_layers: int) -> dict:
    """Per MoD layer: what a skip saves against a dense layer and what a kept token costs beyond
    one, from step times with every router forced to skip / keep (`forced_routing`)."""
    return dict(
        all_skip_step_ms=forced["skip"],
        all_keep_step_ms=forced["keep"],
        mod_layers=mod_layers,
        skip_saves_us=(dense_step_ms - forced["skip"]) / mod_layers * 1e3,
        keep_costs_extra_us=(forced["keep"] - dense_step_ms) / mod_layers * 1e3,
    )


def run_decode_layer(b: Bench) -> None:
    """What one MoD layer costs in a batch-1 decode step, in context: 128-step decodes of the MoD
    model with every router forced to skip (bias -1e4) and forced to keep (+1e4), against dense.
    With 8 MoD layers, (dense - all-skip) / 8 is what a skip saves against a dense layer and
    (all-keep - dense) / 8 what a kept token costs beyond one: the routing overhead in a
    host-bound step, where the layer breakdown (`layer`) only sees GPU time."""
    setting = b.size["decode"][0]
    B, ctx, new = setting["batch"], setting["context"], setting["new"]
    ids = b.ids(B, ctx, 11)

    def step_ms(model) -> float:
        runs = [decode_once(model, ids, new, b.clock)[0] for _ in range(1 + b.size["decode_repeats"])]
        return statistics.median(runs[1:]) / new

    dense = step_ms(b.dense)
    for router, (model, _, _) in b.mods.items():
        record = dict(
            scenario=f"decode_layer_b{B}_ctx{ctx}",
            router=router,
            dense_step_ms=dense,
            **mod_layer_price(dense, forced_routing(model, lambda: step_ms(model)), len(modadapt.mod_layers(model))),
            dense_layer_us_upper_bound=dense / b.shape.L * 1e3,
        )
        b.add(record)
        print(
            f"# decode step B={B} ({router}): dense {dense:.2f} ms; every MoD layer skipping "
            f"{record['all_skip_step_ms']:.2f} ms, keeping {record['all_keep_step_ms']:.2f} ms: a skip saves "
            f"{record['skip_saves_us']:.0f} us, a kept token costs {record['keep_costs_extra_us']:.0f} us beyond a "
            f"dense layer (a dense layer is at most {record['dense_layer_us_upper_bound']:.0f} us)",
            flush=True,
        )


def kv_bytes(cache) -> tuple[int, int]:
    """(K/V tensor bytes over all cache layers, MoD bookkeeping bytes)."""
    kv = book = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                kv += t.numel() * t.element_size()
        for name in ("_mod_index", "_mod_valid", "mod_segments"):  # as stored (reading mod_index unpacks)
            t = layer.__dict__.get(name)
            if isinstance(t, torch.Tensor):
                book += t.numel() * t.element_size()
    return kv, book


def cache_fractions(cache, mod_layers: list[int], B: int, tokens: int) -> tuple[float | None, float | None]:
    """Over the MoD layers: kept (row, token) pairs / all pairs, and stored slots (filler
    included) / all pairs."""
    kept, slots, n = 0.0, 0.0, 0
    for i in mod_layers:
        layer = cache.layers[i]
        if getattr(layer, "mod_segments", None) is not None:  # packed: every slot is a kept pair
            kept += layer.keys.shape[-2] / (B * tokens)
            slots += layer.keys.shape[-2] / (B * tokens)
        elif getattr(layer, "mod_valid", None) is not None:
            kept += float(layer.mod_valid.float().sum()) / (B * tokens)
            slots += layer.keys.shape[-2] / tokens
        else:
            continue
        n += 1
    return (kept / n, slots / n) if n else (None, None)


def decode_once(model, ids: torch.Tensor, new: int, clock: Clock):
    """Prefill into a fresh DynamicCache, then `new` greedy steps; returns (decode ms, cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def steps():
            nonlocal token
            for _ in range(new):
                logits = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)

        ms = clock.time(steps)
    return ms, cache


def run_decode(b: Bench) -> None:
    for setting in b.size["decode"][: b.size["eager_decode"]]:  # eager steps: the long sweep is graphed only
        B, ctx, new = setting["batch"], setting["context"], setting["new"]
        ids = b.ids(B, ctx, 11)

        def measure(model):
            mem: dict = {}
            with peak_memory(b.device, mem, "peak"):
                for _ in range(b.size["decode_warmup"]):
                    decode_once(model, ids, new, b.clock)
                runs = [decode_once(model, ids, new, b.clock) for _ in range(b.size["decode_repeats"])]
            times = [ms for ms, _ in runs]
            return statistics.median(times), times, runs[-1][1], mem["peak"]

        def measure_fresh(model):
            """Each run on a prompt no earlier run used: per-layer MoD cache lengths then differ
            from every earlier run, as they do in service, so shape-keyed caches (cuDNN attention
            graphs) miss. The dense cache lengths depend on the prompt length alone."""
            times = [
                decode_once(model, b.ids(B, ctx, 1000 + r), new, b.clock)[0]
                for r in range(b.size["decode_fresh_repeats"])
            ]
            return statistics.median(times), times

        dense_ms, dense_all, dense_cache, dense_peak = measure(b.dense)
        dense_fresh, dense_fresh_all = measure_fresh(b.dense)
        dense_kv, _ = kv_bytes(dense_cache)
        del dense_cache
        elt = torch.finfo(b.dtype).bits // 8
        dense_bytes = decode_bytes(b.shape, B, ctx, new, None, elt)
        for router, (model, nominal, _) in b.mods.items():
            mod_ms, mod_all, mod_cache, mod_peak = measure(model)
            mod_fresh, mod_fresh_all = measure_fresh(model)
            mod_kv, book = kv_bytes(mod_cache)
            kept, slots = cache_fractions(mod_cache, b.shape.mod_layers, B, ctx + new)
            del mod_cache
            f = kept if kept is not None else nominal
            goal, kv_goal = setting["goals"].get(router), KV_GOAL.get(router)
            speedup = dense_ms / mod_ms
            b.add(
                dict(
                    scenario=f"decode_b{B}_ctx{ctx}",
                    router=router,
                    batch=B,
                    context=ctx,
                    new_tokens=new,
                    **decode_speed_fields(
                        B, new, dense_ms, mod_ms, dense_bytes / decode_bytes(b.shape, B, ctx, new, f, elt)
                    ),
                    kept_fraction=kept,
                    slot_fraction=slots,
                    dense_kv_bytes=dense_kv,
                    mod_kv_bytes=mod_kv,
                    kv_ratio=mod_kv / dense_kv,
                    mod_book_bytes=book,
                    kv_goal=kv_goal,
                    kv_met=None if kv_goal is None else mod_kv / dense_kv <= kv_goal,
                    goal=goal,
                    met=None if goal is None else speedup >= goal,
                    dense_peak_bytes=dense_peak,
                    mod_peak_bytes=mod_peak,
                    dense_times_ms=dense_all,
                    mod_times_ms=mod_all,
                    dense_ms_fresh_prompt=dense_fresh,
                    mod_ms_fresh_prompt=mod_fresh,
                    speedup_fresh_prompt=dense_fresh / mod_fresh,
                    dense_times_ms_fresh_prompt=dense_fresh_all,
                    mod_times_ms_fresh_prompt=mod_fresh_all,
                )
            )


def greedy_tokens(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Eager greedy decoding with a DynamicCache: `[B, new]`, the tokens each step emits after
    the prompt's own, to check the graphed decoder against."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens = []
    with torch.inference_mode():
        out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new):
            token = (
                model(input_ids=token, **cache_kwarg(model, cache), use_cache=True)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
            tokens.append(token)
    return torch.cat(tokens, 1)


def teacher_forced_agreement(decoder, ids: torch.Tensor, eager: torch.Tensor) -> tuple[float, float]:
    """The share of steps where the graphed step emits eager decoding's token when fed eager's
    previous token (free-running, one bf16 near-tie would make every later token differ): over
    all rows, and for the row that agrees least (a broken row would show there)."""
    step = decoder.prefill(ids, None, eager.shape[1])
    same = []
    with torch.inference_mode():
        for t in range(eager.shape[1]):
            if t:
                step.token.copy_(eager[:, t - 1 : t])
            decoder.decode(1)
            same.append(step.token == eager[:, t : t + 1])
    same = torch.cat(same, 1).float()
    return float(same.mean()), float(same.mean(1).min())


def check_static_attention(device, dtype) -> dict:
    """The graphed decoder's attention on CUDA (flash, reading each row's used slots; and the
    default decode kernel, `static_cache.DECODE_KERNEL`: `default_kernel_*`) against its masked-SDPA fallback, on random K/V with random per-row lengths (B=32, GQA 32/8 heads; a
    quarter of the rows at length 0, as rows that skip a MoD layer in a batch: compared on the
    other rows, where the fallback is defined). `gathered_*`: the same for a gathered call
    (`branches="gather"`), 12 query rows reading cache rows named out of order through `cu_k`."""
    from modadapt.adapters.hf.attention import static_decode_attention
    from modadapt.decoding import static_cache

    gen = torch.Generator(device="cpu").manual_seed(3)
    B, H, Hk, d, cap = 32, 32, 8, 64, 2304
    q = torch.randn(B, H, 1, d, generator=gen).to(device, dtype)
    k, v = (torch.randn(B, cap, Hk, d, generator=gen).to(device, dtype) for _ in range(2))
    used = torch.randint(1, cap + 1, (B,), generator=gen)
    used[::4] = 0
    used = used.to(device, torch.int32)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
    lengths = static_cache.KeyLengths(used, cu_q, cu_q * cap)
    key = static_cache.flash_key(q)
    saved, kernel = static_cache._FLASH.get(key), static_cache.DECODE_KERNEL
    split = static_decode_attention(None, q, k, v, lengths, scaling=d**-0.5)[0].float()  # the default kernel
    try:
        static_cache.DECODE_KERNEL = "flash"
        static_cache._FLASH.pop(key, None)
        fast = static_decode_attention(None, q, k, v, lengths, scaling=d**-0.5)[0].float()
        flash = static_cache._FLASH.get(key)
        static_cache._FLASH[key] = False
        ref = static_decode_attention(None, q, k, v, lengths, scaling=d**-0.5)[0].float()
        # a gathered call (branches="gather"): 12 query rows reading cache rows out of order
        gathered = torch.randperm(B, generator=gen)[:12].to(device)
        starts = torch.cat([gathered * cap, torch.tensor([B * cap], device=device)]).to(torch.int32)
        rows_lengths = static_cache.KeyLengths(used[gathered], cu_q[:13], starts, rows=gathered)
        static_cache._FLASH.pop(key, None)
        fast_rows = static_decode_attention(None, q[:12], k, v, rows_lengths, scaling=d**-0.5)[0].float()
        flash_rows = static_cache._FLASH.get(key)
        static_cache._FLASH[key] = False
        ref_rows = static_decode_attention(None, q[:12], k, v, rows_lengths, scaling=d**-0.5)[0].float()
    finally:
        static_cache.DECODE_KERNEL = kernel
        static_cache._FLASH.pop(key, None) if saved is None else static_cache._FLASH.__setitem__(key, saved)
    rows = used > 0
    empty_rows_zero = bool((split[~rows] == 0).all())
    fast, ref, split = fast[rows], ref[rows], split[rows]
    kept = used[gathered] > 0
    fast_rows, ref_rows = fast_rows[kept], ref_rows[kept]
    return dict(
        flash=flash,
        rel_diff=float((fast - ref).norm() / ref.norm()),
        max_abs_diff=float((fast - ref).abs().max()),
        zero_length_rows=int((~rows).sum()),
        gathered_flash=flash_rows,
        gathered_rel_diff=float((fast_rows - ref_rows).norm() / ref_rows.norm()),
        decode_kernel=kernel,
        default_kernel_rel_diff=float((split - ref).norm() / ref.norm()),
        default_kernel_max_abs_diff=float((split - ref).abs().max()),
        default_kernel_empty_rows_zero=empty_rows_zero,
    )


def run_decode_graphs(b: Bench) -> None:
    """Decode with `modadapt.GraphedDecoder` for dense and MoD alike: a static per-row compacted
    KV cache read by flash attention up to each row's length, and CUDA graph replays; a MoD layer
    runs only when some row keeps (`branches`, `auto`: `modadapt.decoding.step.auto_branches`,
    conditional nodes, else host decisions between graph pieces at batch 1 or where the prompt says
    that whole layers go unkept, else compute-and-select). Timed: `new` steps after the prompt (the
    prompt runs eagerly and is not timed, as in `decode`). Checked: teacher-forced tokens against
    eager greedy decoding of the same model."""
    from modadapt.decoding import GraphedDecoder

    if b.device.type == "cuda":
        check = check_static_attention(b.device, b.dtype)
        b.add(dict(scenario="static_attention_check", router=None, **check))
        print(f"# static decode attention, flash with used lengths vs masked SDPA: {check}", flush=True)
    elt = torch.finfo(b.dtype).bits // 8
    bandwidth = copy_bandwidth(b.device, 2048 if b.device.type == "cuda" else 64)
    print(f"# copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    for setting in b.size["decode"]:
        B, ctx, new = setting["batch"], setting["context"], setting["new"]
        ids = b.ids(B, ctx, 11)

        def measure(model):
            decoder = GraphedDecoder(model, branches=b.args.graph_branches, compile=b.args.graph_compile)
            t0 = time.perf_counter()
            decoder.prefill(ids, None, new)
            b.clock.sync()
            first_s = time.perf_counter() - t0  # includes the capture (and with --graph-compile, compiling)
            times, mem = [], {}
            with peak_memory(b.device, mem, "peak"):
                for r in range(b.size["decode_warmup"] + b.size["decode_repeats"]):
                    step = decoder.prefill(ids, None, new)
                    start = [n.clone() for n in step.lengths]
                    ms = b.clock.time(lambda: decoder.decode(new))
                    if r >= b.size["decode_warmup"]:
                        times.append(ms)
            added = [float((n - s).float().mean()) / new for n, s in zip(step.lengths, start)]
            allocated, used = decoder.kv_bytes()
            forced = {}
            if B == 1 and model is not b.dense:  # price one MoD layer in the graphed step (see decode_layer)

                def graphed_step_ms():
                    decoder.prefill(ids, None, new)
                    return b.clock.time(lambda: decoder.decode(new)) / new

                forced = forced_routing(model, graphed_step_ms)
            try:  # a failure here (a second capture, for fewer new tokens) keeps the timings above
                agreement, worst_row = teacher_forced_agreement(decoder, ids, greedy_tokens(model, ids, min(new, 32)))
                agreement_error = None
            except Exception as error:  # noqa: BLE001 - recorded, with the traceback in the log
                traceback.print_exc()
                agreement, worst_row = None, None
                agreement_error = error_text(error)
            return dict(
                ms=statistics.median(times),
                times=times,
                first_s=first_s,
                peak=mem["peak"],
                allocated=allocated,
                used=used,
                added=added,
                agreement=agreement,
                worst_row=worst_row,
                agreement_error=agreement_error,
                branches=decoder.last_step.mode if decoder.cuda_graphs else "eager (no graphs)",
                forced=forced,
            )

        dense = measure(b.dense)
        dense_bytes = decode_bytes(b.shape, B, ctx, new, None, elt)
        bound_ms = dense_bytes / new / bandwidth * 1e3  # per step
        try:
            hf_ms, hf_error = hf_static_step_ms(b.dense, ids, new, b.clock), None
        except Exception as error:  # noqa: BLE001 - the user's alternative failing is a result too
            hf_ms, hf_error = None, error_text(error, 200)
        step_ms = dense["ms"] / new
        print(
            f"# dense graphed{' compiled' if b.args.graph_compile else ''} B={B} ctx={ctx}: {step_ms:.3f} ms/step, "
            f"bytes bound {bound_ms:.3f} ms ({step_ms / bound_ms:.2f}x), first call {dense['first_s']:.1f} s, "
            f"transformers static-cache {'failed: ' + hf_error if hf_ms is None else f'{hf_ms:.3f} ms'}",
            flush=True,
        )
        bound = dict(
            bytes_bound_ms=bound_ms,
            copy_bandwidth_bytes_s=bandwidth,
            dense_vs_bound=step_ms / bound_ms,
            dense_hf_static_ms=hf_ms,
            dense_hf_static_error=hf_error,
            dense_beats_hf_static=None if hf_ms is None else step_ms < hf_ms,
        )
        for router, (model, _nominal, _) in b.mods.items():
            try:
                mod = measure(model)
            except Exception as error:  # noqa: BLE001 - one failing cell is a result; the sweep goes on
                label, graph_compile = f"decode_graphs B={B} ctx={ctx} {router}", b.args.graph_compile
                cell = dict(scenario=f"decode_graphs_b{B}_ctx{ctx}", router=router, batch=B, context=ctx)
                add_failure(b, label, dict(cell, graph_compile=graph_compile), error)
                continue
            kept = statistics.mean(mod["added"][i] for i in b.shape.mod_layers)
            goal = setting["goals"].get(router)
            speedup = dense["ms"] / mod["ms"]
            ideal_speedup = dense_bytes / decode_bytes(b.shape, B, ctx, new, kept, elt)
            record = dict(
                scenario=f"decode_graphs_b{B}_ctx{ctx}",
                router=router,
                batch=B,
                context=ctx,
                new_tokens=new,
                **decode_speed_fields(B, new, dense["ms"], mod["ms"], ideal_speedup),
                kept_fraction=kept,
                branches=mod["branches"],
                **graph_fields(b),
                dense_kv_bytes=dense["allocated"],
                mod_kv_bytes=mod["allocated"],
                kv_ratio=mod["allocated"] / dense["allocated"],
                dense_kv_used_bytes=dense["used"],
                mod_kv_used_bytes=mod["used"],
                kv_used_ratio=mod["used"] / dense["used"],
                goal=goal,
                met=None if goal is None else speedup >= goal,
                dense_peak_bytes=dense["peak"],
                mod_peak_bytes=mod["peak"],
                dense_times_ms=dense["times"],
                mod_times_ms=mod["times"],
                dense_first_call_s=dense["first_s"],
                mod_first_call_s=mod["first_s"],
                dense_teacher_forced_agreement=dense["agreement"],
                mod_teacher_forced_agreement=mod["agreement"],
                dense_worst_row_agreement=dense["worst_row"],
                mod_worst_row_agreement=mod["worst_row"],
                dense_agreement_error=dense["agreement_error"],
                mod_agreement_error=mod["agreement_error"],
                **bound,
            )
            if mod["forced"]:
                step_ms = dense["ms"] / new
                record.update(mod_layer_price(step_ms, mod["forced"], len(modadapt.mod_layers(model))))
                print(
                    f"# graphed step B=1 ({router}): dense {step_ms:.3f} ms; all MoD layers skipping "
                    f"{mod['forced']['skip']:.3f} ms, keeping {mod['forced']['keep']:.3f} ms: a skip saves "
                    f"{record['skip_saves_us']:.0f} us, a kept token costs "
                    f"{record['keep_costs_extra_us']:.0f} us beyond a dense layer",
                    flush=True,
                )
            b.add(record)


def branch_modes(b: Bench) -> list[str]:
    """The modes `decode_branches` times: `--branch-modes`, else every mode this torch captures
    but `auto` (which is one of them), `select` first (the others' tokens are checked against it)."""
    from modadapt.decoding import available_branches

    modes = b.args.branch_modes.split(",") if b.args.branch_modes else [m for m in available_branches() if m != "auto"]
    return sorted(modes, key=lambda m: m != "select")


def run_decode_branches(b: Bench) -> None:
    """Every `GraphedDecoder` branch mode, per router, at the shapes where they differ (issue 17:
    a row that skips a MoD layer at batch should cost close to nothing; B=32 and B=128 at 2k
    context, B=8 at 32k): ms per step of `new` graphed decode steps after the prompt, which is
    prefilled once per mode (capture included, `first_call_s`); the step is rewound before each
    run (warm-up, then the median of the repeats). Checked: each mode's tokens, fed select
    mode's (teacher-forced), against select mode's. What it decides: `branches="auto"`
    (`modadapt.decoding.step.auto_branches`); the fastest mode per router and shape is printed
    and recorded (`decode_branches_best_*`)."""
    from modadapt.decoding import GraphedDecoder

    if b.device.type == "cuda":
        check = check_static_attention(b.device, b.dtype)
        b.add(dict(scenario="static_attention_check", router=None, **check))
        print(f"# static decode attention, flash with used lengths vs masked SDPA: {check}", flush=True)
    modes = branch_modes(b)
    elt = torch.finfo(b.dtype).bits // 8
    warmup, repeats = b.size["decode_warmup"], b.size["decode_repeats"]
    for setting in b.size["branches"]:
        B, ctx, new = setting["batch"], setting["context"], setting["new"]
        ids = b.ids(B, ctx, 11)
        scenario = f"decode_branches_b{B}_ctx{ctx}"

        def measure(model, mode, reference=None):
            decoder = GraphedDecoder(model, branches=mode, compile=b.args.graph_compile)
            try:
                t0 = time.perf_counter()
                step = decoder.prefill(ids, None, new)
                b.clock.sync()
                first_s = time.perf_counter() - t0
                prompt = [n.clone() for n in step.lengths]
                times = []
                for r in range(warmup + repeats):
                    decoder.rewind()
                    ms = b.clock.time(lambda: decoder.decode(new))
                    if r >= warmup:
                        times.append(ms)
                added = [float((n - s).float().mean()) / new for n, s in zip(step.lengths, prompt)]
                tokens = step.out.clone()
                same = None
                if reference is not None:  # teacher-forced: fed select's tokens, does it emit them?
                    decoder.rewind()
                    agree = []
                    with torch.inference_mode():
                        for t in range(new):
                            if t:
                                step.token.copy_(reference[:, t - 1 : t])
                            decoder.decode(1)
                            agree.append(step.token == reference[:, t : t + 1])
                    same = torch.cat(agree, 1).float()
                return dict(
                    ms=statistics.median(times),
                    times=times,
                    first_s=first_s,
                    added=added,
                    tokens=tokens,
                    same=None if same is None else float(same.mean()),
                    same_worst_row=None if same is None else float(same.mean(1).min()),
                    branches=decoder.last_step.mode if decoder.cuda_graphs else f"{mode} (eager, no graphs)",
                    kv_bytes=decoder.kv_bytes()[0],
                )
            finally:
                step = None
                decoder.reset()
                _free_memory(b.device)

        dense = measure(b.dense, "auto")
        dense_bytes = decode_bytes(b.shape, B, ctx, new, None, elt)
        print(f"# decode_branches B={B} ctx={ctx}: dense graphed {dense['ms'] / new:.3f} ms/step", flush=True)
        for router, (model, _nominal, _) in b.mods.items():
            timed, reference = {}, None
            for mode in modes:
                base = dict(scenario=scenario, router=router, branches=mode, batch=B, context=ctx, new_tokens=new)
                try:
                    mod = measure(model, mode, reference)
                except Exception as error:  # noqa: BLE001 - one failing cell is a result; the sweep goes on
                    add_failure(b, f"{scenario} {router} {mode}", dict(base, graph_compile=b.args.graph_compile), error)
                    continue
                if mode == "select":
                    reference = mod["tokens"]
                kept = statistics.mean(mod["added"][i] for i in b.shape.mod_layers)
                timed[mode] = mod["ms"] / new
                ideal_speedup = dense_bytes / decode_bytes(b.shape, B, ctx, new, kept, elt)
                print(
                    f"# {scenario} {router} {mode}: {mod['ms'] / new:.3f} ms/step ({dense['ms'] / mod['ms']:.2f}x "
                    f"dense), kept {kept:.3f}, tokens as select {mod['same']}",
                    flush=True,
                )
                b.add(
                    dict(
                        base,
                        **decode_speed_fields(B, new, dense["ms"], mod["ms"], ideal_speedup),
                        dense_times_ms=dense["times"],
                        mod_times_ms=mod["times"],
                        kept_fraction=kept,
                        captured_as=mod["branches"],
                        **graph_fields(b),
                        mod_first_call_s=mod["first_s"],
                        mod_kv_bytes=mod["kv_bytes"],
                        tokens_as_select=mod["same"],
                        tokens_as_select_worst_row=mod["same_worst_row"],
                        goal=None,
                        met=None,
                    )
                )
            if timed:
                best = min(timed, key=timed.get)
                print(
                    f"# {scenario} {router}: fastest {best} "
                    f"({', '.join(f'{m} {ms:.3f}' for m, ms in sorted(timed.items(), key=lambda x: x[1]))} ms/step)",
                    flush=True,
                )
                b.add(
                    dict(
                        scenario=f"decode_branches_best_b{B}_ctx{ctx}",
                        router=router,
                        batch=B,
                        context=ctx,
                        best=best,
                        ms_per_step=timed,
                        dense_ms_per_step=dense["ms"] / new,
                    )
                )


def allocation_by_batch(lengths: list[torch.Tensor], per_slot: list[int], new: int) -> list[int]:
    """K/V bytes a static step for the first b rows of a prefilled batch allocates, b = 1..B (what
    `GraphedDecoder.prefill` sizes: each layer's capacity is its widest row's prompt slots plus
    `new`, rounded up to the bucket). `lengths`: each layer's per-row prompt slots; `per_slot`:
    each layer's K+V bytes per slot of a row."""
    from modadapt.decoding import BUCKET

    B = len(lengths[0])
    per_row = torch.zeros(B, dtype=torch.long)
    for n, slot in zip(lengths, per_slot):
        widest = torch.cummax(n.detach().cpu().long(), 0).values
        per_row += (widest + new + BUCKET - 1) // BUCKET * BUCKET * slot
    return (per_row * torch.arange(1, B + 1)).tolist()


def _size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the tiny budget is 1 MiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_budget_measure(b: Bench, model, budget: int, setting: dict) -> dict:
    """One model of `decode_kv_budget`: its K/V per row from a probe batch, the largest batch
    whose static cache fits `budget`, and `new` decode steps at that batch (median of the
    repeats; the prompt is prefilled once, `prefill_rows` rows per pass, and the step rewound
    before each run). The rows are the first of one fixed set (`b.ids` is prefix-stable), so the
    probe's rows are the batch's first. A MoD layer's capacity follows the widest row's kept
    tokens, which can grow with the batch: if the allocation then exceeds the budget, the batch
    steps down to the largest that fits by the rows' own prompt lengths and is prefilled again.
    A batch that runs out of memory is halved. Both are noted in `events`."""
    from modadapt.decoding import GraphedDecoder

    ctx, new, rows = setting["context"], setting["new"], setting["prefill_rows"]
    seed = 41
    decoder = GraphedDecoder(model, branches=b.args.graph_branches, compile=b.args.graph_compile)
    step = None
    try:
        probe = decoder.prefill(b.ids(setting["probe_batch"], ctx, seed), None, new, rows_per_pass=rows)
        probe_allocated, _ = decoder.kv_bytes()
        per_row = probe_allocated // probe.batch
        del probe
        decoder.reset()
        _free_memory(b.device)
        estimate = budget // per_row
        batch, events, oom_batches, stepped_down = estimate, [], [], []
        while batch >= 1:
            oom = None
            try:
                resident = torch.cuda.memory_allocated() if b.device.type == "cuda" else None
                mem: dict = {}
                with peak_memory(b.device, mem, "prefill"):
                    t0 = time.perf_counter()
                    step = decoder.prefill(b.ids(batch, ctx, seed), None, new, rows_per_pass=rows)
                    b.clock.sync()
                    prefill_s = time.perf_counter() - t0
                allocated, _ = decoder.kv_bytes()
                if allocated > budget:  # the widest row of some MoD layer grew past the probe's bucket
                    per_slot = [2 * k.shape[2] * k.shape[3] * k.element_size() for k in step.keys]
                    sizes = allocation_by_batch(step.lengths, per_slot, new)
                    fits = max((n for n in range(1, batch) if sizes[n - 1] <= budget), default=0)
                    events.append(
                        f"batch {batch}: K/V {allocated} B > budget {budget} B (a MoD layer's widest row grew "
                        f"past the probe's bucket); {fits} rows fit by their prompt lengths"
                    )
                    stepped_down.append(batch)
                    del step
                    decoder.reset()
                    _free_memory(b.device)
                    batch = fits
                    continue
                prompt = [n.clone() for n in step.lengths]
                times = []
                with peak_memory(b.device, mem, "decode"):
                    for r in range(b.size["decode_warmup"] + b.size["decode_repeats"]):
                        decoder.rewind()
                        ms = b.clock.time(lambda: decoder.decode(new))
                        if r >= b.size["decode_warmup"]:
                            times.append(ms)
                _, used = decoder.kv_bytes()
                added = [float((n - s).float().mean()) / new for n, s in zip(step.lengths, prompt)]
                prompt_slots = [float(n.float().mean()) / ctx for n in prompt]
                ms = statistics.median(times)
                return dict(
                    batch=batch,
                    estimate_batch=estimate,
                    probe_batch=setting["probe_batch"],
                    kv_bytes_per_row=per_row,
                    kv_allocated_bytes=allocated,
                    kv_used_bytes=used,
                    kv_fits=allocated <= budget,
                    next_row_exceeds=(batch + 1) * per_row > budget,
                    capacities=list(step.capacities),
                    ms=ms,
                    ms_per_step=ms / new,
                    tokens_per_s=batch * new / ms * 1e3,
                    times_ms=times,
                    prefill_s=prefill_s,
                    added=added,
                    prompt_slots=prompt_slots,
                    branches=decoder.last_step.mode if decoder.cuda_graphs else "eager (no graphs)",
                    resident_bytes=resident,
                    prefill_peak_bytes=mem["prefill"],
                    decode_peak_bytes=mem["decode"],
                    events=events,
                    oom_batches=oom_batches,
                    stepped_down_from=stepped_down,
                )
            except _oom_types() as error:
                oom = error_text(error, 200)
            # out of the handler: the traceback (and the tensors its frames hold) is gone
            step = None
            decoder.reset()
            _free_memory(b.device)
            events.append(f"batch {batch}: out of memory ({oom}); halved")
            print(f"# decode_kv_budget: out of memory at batch {batch}, trying {batch // 2}", flush=True)
            oom_batches.append(batch)
            batch //= 2
        raise RuntimeError(f"no batch fits: K/V per row {per_row} B, budget {budget} B; {'; '.join(events)}")
    finally:
        step = None  # with the decoder's captured steps: the last reference to the buffers
        decoder.reset()
        _free_memory(b.device)


def run_decode_kv_budget(b: Bench) -> None:
    """Throughput at a fixed K/V budget: a MoD row's static cache is smaller (its MoD layers hold
    only the kept tokens), so more rows fit. For dense, then each router: the largest batch whose
    K/V fits the budget (`--kv-budget-gib`), its tokens/s over `new` graphed decode steps, and
    `speedup` = MoD tokens/s / dense tokens/s (each at its own batch). The bytes ideal is the same
    ratio of batch / bytes read per step (`decode_bytes`)."""
    setting = b.size["kv_budget"]
    gib = b.args.kv_budget_gib if b.args.kv_budget_gib is not None else setting["budget_gib"]
    budget = int(gib * 2**30)
    ctx, new = setting["context"], setting["new"]
    elt = torch.finfo(b.dtype).bits // 8
    scenario = f"decode_kv_budget_ctx{ctx}"
    base = dict(
        scenario=scenario,
        context=ctx,
        new_tokens=new,
        kv_budget_bytes=budget,
        kv_budget_gib=gib,
        graph_compile=b.args.graph_compile,
    )
    dense = None
    for name, model in [("dense", b.dense), *((r, m) for r, (m, _, _) in b.mods.items())]:
        try:
            got = kv_budget_measure(b, model, budget, setting)
        except Exception as error:  # noqa: BLE001 - one failing model is a result; the others go on
            add_failure(b, f"decode_kv_budget {name}", dict(**base, router=name), error)
            continue
        added, prompt_slots = got.pop("added"), got.pop("prompt_slots")
        mod_layers = b.shape.mod_layers if model is not b.dense else []
        kept = statistics.mean(added[i] for i in mod_layers) if mod_layers else None
        prompt_kept = statistics.mean(prompt_slots[i] for i in mod_layers) if mod_layers else None
        bytes_per_token = decode_bytes(b.shape, got["batch"], ctx, new, kept, elt) / (got["batch"] * new)
        print(
            f"# decode_kv_budget {name}: K/V {_size(got['kv_bytes_per_row'])}/row (probe of "
            f"{got['probe_batch']}), budget {_size(budget)} -> batch {got['batch']} (allocated "
            f"{_size(got['kv_allocated_bytes'])}), {new} steps {got['ms']:.1f} ms: "
            f"{got['tokens_per_s']:.0f} tok/s" + (f"; {'; '.join(got['events'])}" if got["events"] else ""),
            flush=True,
        )
        record = dict(**base, router=name, **got, kept_fraction=kept, prompt_kept_fraction=prompt_kept)
        record["ideal_bytes_per_token"] = bytes_per_token
        if name == "dense":
            dense = got | {"bytes_per_token": bytes_per_token}
            b.add(record)
            continue
        if dense is not None:
            goal = setting["goals"].get(name)
            speedup = got["tokens_per_s"] / dense["tokens_per_s"]
            record.update(
                dense_batch=dense["batch"],
                mod_batch=got["batch"],
                dense_ms=dense["ms"],
                mod_ms=got["ms"],
                speedup=speedup,
                ideal_speedup=dense["bytes_per_token"] / bytes_per_token,
                ideal_basis="bytes",
                dense_tokens_per_s=dense["tokens_per_s"],
                mod_tokens_per_s=got["tokens_per_s"],
                dense_kv_bytes_per_row=dense["kv_bytes_per_row"],
                mod_kv_bytes_per_row=got["kv_bytes_per_row"],
                kv_row_ratio=got["kv_bytes_per_row"] / dense["kv_bytes_per_row"],
                dense_kv_allocated_bytes=dense["kv_allocated_bytes"],
                mod_kv_allocated_bytes=got["kv_allocated_bytes"],
                dense_prefill_peak_bytes=dense["prefill_peak_bytes"],
                mod_prefill_peak_bytes=got["prefill_peak_bytes"],
                dense_decode_peak_bytes=dense["decode_peak_bytes"],
                mod_decode_peak_bytes=got["decode_peak_bytes"],
                dense_times_ms=dense["times_ms"],
                mod_times_ms=got["times_ms"],
                goal=goal,
                met=None if goal is None else speedup >= goal,
            )
        b.add(record)


def speculative_round_bytes(s: Shape, B: int, context: int, k: int, kept: list[float], elt: int) -> float:
    """Bytes one speculative round reads: `k` draft steps (a MoD layer's weights when any row
    keeps the token, probability `1 - (1 - f)^B`; a row that keeps reads the dense cache of that
    layer, `f` of the rows) and one verification (every weight and the whole cache, once for all
    `k + 1` tokens). `kept` is each MoD layer's measured draft keep fraction."""
    f = dict(zip(s.mod_layers, kept))
    kv_read = B * context * s.kv * 2 * elt
    step = s.head_params * elt + B * s.D * elt
    for i in range(s.L):
        if i in f:
            step += (1 - (1 - f[i]) ** B) * s.layer_params * elt + f[i] * kv_read
        else:
            step += s.layer_params * elt + kv_read
    verify = decode_bytes(s, B, context, 1, None, elt)
    return k * step + verify


def speculate_models(b: Bench) -> dict:
    """name -> (converted model, its dense twin, shape, directory or None): with --speculate-model, the saved converted
    models (`modadapt.save`; trained: their acceptance is what the measurement is for), named by
    their directory (``run/model`` by ``run``); without, the benchmark's MoD models (random
    weights: acceptance says little, the costs are real)."""
    if not b.args.speculate_model:
        return {router: (model, b.dense, b.shape, None) for router, (model, _, _) in b.mods.items()}
    models = {}
    for directory in b.args.speculate_model:
        path = Path(directory)
        name = path.parent.name if path.name == "model" else path.name
        model = modadapt.load(path).to(b.device, b.dtype).eval()
        dense = modadapt.unload(copy.deepcopy(model))
        shape = Shape.of(dense)
        shape.mod_layers = list(model._modadapt_state.layer_indices)
        models[name] = (model, dense, shape, str(path))
    return models


def model_facts(dense: torch.nn.Module, shape: Shape) -> dict:
    """The record fields that describe the model a scenario ran (over the benchmark's own)."""
    config = dense.config.get_text_config(decoder=True)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {
        "parameters": sum(p.numel() for p in dense.parameters()),
        "mod_layers": shape.mod_layers,
        "model_config": {k: getattr(config, k, None) for k in (*keys, "vocab_size", "max_position_embeddings")},
    }


def speculate_prompts(b: Bench, directory: str | None, vocab: int, B: int, ctx: int) -> torch.Tensor:
    """`B` prompts of `ctx` tokens: with --speculate-text, windows spread over that text, tokenized
    by the tokenizer saved beside the model (acceptance on real text is the number that matters);
    else random tokens."""
    if not (b.args.speculate_text and directory):
        return torch.randint(0, vocab, (B, ctx), generator=torch.Generator().manual_seed(13)).to(b.device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    opener = gzip.open if b.args.speculate_text.endswith(".gz") else open
    with opener(b.args.speculate_text, "rt", encoding="utf-8") as f:
        text = f.read(B * ctx * 12)  # a few characters per token, with room to spread the windows
    ids = torch.tensor(tokenizer(text)["input_ids"])
    if len(ids) < B * ctx:
        raise SystemExit(f"--speculate-text: {len(ids)} tokens, fewer than {B} prompts of {ctx}")
    starts = torch.linspace(0, len(ids) - ctx, B).long()
    return torch.stack([ids[s : s + ctx] for s in starts.tolist()]).to(b.device)


def hf_assisted(dense, model, ids: torch.Tensor, new: int, clock: Clock) -> dict:
    """transformers' own assisted decoding, the user's alternative: the dense model's greedy
    `generate` with the converted model as `assistant_model` (eager, two copies of the weights,
    batch 1), next to plain greedy `generate` of the dense model; both tokens must agree."""

    def gen(**kwargs):
        return lambda: dense.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs
        )

    try:
        with torch.inference_mode():
            plain_tokens, assisted_tokens = gen()(), gen(assistant_model=model)()  # warm-up, and the tokens
            plain_ms = statistics.median(clock.time(gen()) for _ in range(2))
            assisted_ms = statistics.median(clock.time(gen(assistant_model=model)) for _ in range(2))
    except Exception as error:  # noqa: BLE001 - the alternative failing is a result too
        return dict(hf_assisted_error=error_text(error, 200))
    return dict(
        hf_plain_ms=plain_ms,
        hf_assisted_ms=assisted_ms,
        hf_assisted_speedup=plain_ms / assisted_ms,
        hf_assisted_same_tokens=bool(torch.equal(plain_tokens, assisted_tokens)),
    )


def round_split(b: Bench, step, decoder, k: int, new: int) -> dict:
    """A speculative round's cost split: its K draft steps and its verification timed apart (each
    its own event pair, so a sync between them), rounds until a row would pass `new` tokens.
    Medians in ms: `draft_step_ms` (one draft step) and `verify_ms`."""
    drafts, verifies = [], []
    with torch.inference_mode(), decoder.parts.static_attention(), decoder.compiler.compiled():
        while int(step.count.max()) + k + 1 <= new:
            drafts.append(b.clock.time(lambda: [step.draft_token() for _ in range(k)]) / k)
            verifies.append(b.clock.time(step.verify))
    return {"draft_step_ms": statistics.median(drafts), "verify_ms": statistics.median(verifies)} if drafts else {}


def round_costs(split: dict, dense_step_ms: float, per_round: float, k: int) -> dict:
    """Where a round's time goes, against dense decoding of the same tokens: `draft_ratio` (a draft
    step over a dense step), `verify_ratio` (the verification over a dense step), and the draft
    ratio at which speculation breaks even at the measured tokens per round,
    `(tokens_per_round - verify_ratio) / K`: a draft dearer than that loses to dense decoding."""
    if not split:
        return {}
    draft, verify = split["draft_step_ms"] / dense_step_ms, split["verify_ms"] / dense_step_ms
    return dict(
        split,
        dense_step_ms=dense_step_ms,
        draft_ratio=draft,
        verify_ratio=verify,
        break_even_draft_ratio=(per_round - verify) / k,
    )


def run_decode_speculative(b: Bench) -> None:
    """Speculative decoding (`GraphedDecoder(model, speculate=K, draft=...)`: the converted model
    drafts K tokens, the dense computation of the same weights verifies them in one forward) against
    graphed dense decoding of the same weights, greedy. Timed: the rounds until every row has
    `new` tokens (the prompt and its capture are not timed; generate's host check every
    `CHECK_EVERY // (K + 1)` rounds is). Batch 1 decodes `prompts` prompts in turn (the windows a
    batch of that many would decode; a single text's acceptance says little) and adds up their
    times. Recorded: tokens/s of both, the acceptance (accepted drafts / drafted tokens), tokens
    per round, each MoD layer's draft keep fraction, and how many leading tokens equal dense
    graphed decoding's (greedy speculation is exact up to kernel rounding: in bf16 a near-tie may
    flip)."""
    from modadapt.decoding import CHECK_EVERY, Draft, GraphedDecoder
    from modadapt.decoding.speculate import acceptance_stats

    elt = torch.finfo(b.dtype).bits // 8
    ks = [int(k) for k in b.args.speculate_k.split(",")] if b.args.speculate_k else list(b.size["speculate_k"])
    drafts = [Draft.of(d) for d in (b.args.draft or [None])]  # None: the library's default draft
    repeats = range(b.size["decode_warmup"] + b.size["decode_repeats"])

    def timed(prefill, run) -> list[float]:
        """The repeats' times in ms (warm-ups dropped), each after its own untimed prefill."""
        times = []
        for r in repeats:
            step = prefill()
            ms = b.clock.time(lambda: run(step))
            if r >= b.size["decode_warmup"]:
                times.append(ms)
        return times

    def summed(per_prompt: list[list[float]]) -> list[float]:
        return [sum(column) for column in zip(*per_prompt)]

    for name, (model, dense, shape, directory) in speculate_models(b).items():
        vocab = model.config.get_text_config(decoder=True).vocab_size
        for setting in b.size["speculate"]:
            B, ctx, new = setting["batch"], b.args.speculate_context or setting["context"], setting["new"]
            prompts = (b.args.speculate_prompts or setting.get("prompts", 1)) if B == 1 else 1
            texts = speculate_prompts(b, directory, vocab, B * prompts, ctx)
            groups = list(texts.split(B))  # batch 1: one prompt at a time
            plain = GraphedDecoder(dense, branches=b.args.graph_branches, compile=b.args.graph_compile)
            t0 = time.perf_counter()
            plain.prefill(groups[0], None, new)
            b.clock.sync()
            dense_first_s = time.perf_counter() - t0  # the capture (and with --graph-compile, compiling)
            references = [plain.generate(ids, max_new_tokens=new, eos_token_id=[])[:, ctx:] for ids in groups]
            dense_times = summed(
                [
                    timed(lambda ids=ids: plain.prefill(ids, None, new), lambda _: plain.decode(new - 1))
                    for ids in groups
                ]
            )
            dense_ms = statistics.median(dense_times)
            dense_step = decode_bytes(shape, B, ctx, 1, None, elt)
            assisted = hf_assisted(dense, model, groups[0], new, b.clock) if B == 1 else {}
            for k, draft in itertools.product(ks, drafts):
                decoder = GraphedDecoder(
                    model, branches=b.args.graph_branches, speculate=k, draft=draft, compile=b.args.graph_compile
                )
                every = max(1, CHECK_EVERY // (k + 1))
                t0 = time.perf_counter()
                decoder.prefill(groups[0], None, new)
                b.clock.sync()
                first_s = time.perf_counter() - t0

                def rounds(step):
                    fewest = 1
                    while fewest < new:
                        decoder.decode(min(every, new - fewest))
                        fewest = int(step.count.min())

                per_prompt, rounds_of, accepted_of, same = [], [], [], []
                for ids, reference in zip(groups, references):
                    per_prompt.append(timed(lambda ids=ids: decoder.prefill(ids, None, new), rounds))
                    step, stats = decoder.last_step, decoder.speculation_stats()
                    rounds_of += stats["rounds"]
                    accepted_of += stats["accepted"]
                    same.append((step.out[:, :new] == reference).long().cumprod(1).sum(1).float() / new)
                same = torch.cat(same)
                overall = acceptance_stats(k, rounds_of, accepted_of)  # every prompt's rows together
                per_round = overall["tokens_per_round"]
                step = decoder.prefill(groups[0], None, new)  # one round's drafts: what each MoD layer kept
                with torch.inference_mode(), decoder.parts.static_attention():
                    for _ in range(k):
                        step.draft_token()
                kept = [float((step.draft.lengths[i] - step.base).float().mean()) / k for i in shape.mod_layers]
                split = round_split(b, decoder.prefill(groups[0], None, new), decoder, k, new)
                times = summed(per_prompt)
                spec_ms = statistics.median(times)
                b.add(
                    dict(
                        scenario=f"decode_speculative_b{B}_ctx{ctx}_k{k}",
                        router=name,
                        **model_facts(dense, shape),
                        batch=B,
                        context=ctx,
                        new_tokens=new,
                        prompts_in_turn=len(groups),  # batch 1: prompts decoded one after another
                        k=k,
                        draft=str(draft),
                        dense_ms=dense_ms,
                        mod_ms=spec_ms,
                        speedup=dense_ms / spec_ms,
                        ideal_speedup=per_round * dense_step / speculative_round_bytes(shape, B, ctx, k, kept, elt),
                        ideal_basis="bytes at the measured acceptance",
                        dense_tokens_per_s=len(groups) * B * (new - 1) / dense_ms * 1e3,
                        mod_tokens_per_s=len(groups) * B * (new - 1) / spec_ms * 1e3,  # after the prefills'
                        acceptance=overall["acceptance"],
                        tokens_per_round=per_round,
                        rounds=rounds_of,
                        accepted=accepted_of,
                        draft_kept_fraction=kept,
                        same_prefix_as_dense=float(same.mean()),
                        same_prefix_worst_row=float(same.min()),
                        branches=decoder.last_step.mode if decoder.cuda_graphs else "eager (no graphs)",
                        **graph_fields(b),
                        dense_first_call_s=dense_first_s,
                        mod_first_call_s=first_s,
                        **round_costs(split, dense_ms / len(groups) / (new - 1), per_round, k),
                        goal=None,
                        met=None,
                        dense_times_ms=dense_times,
                        mod_times_ms=times,
                        **assisted,
                    )
                )


def _oom_types() -> tuple:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)


def run_train(b: Bench) -> None:
    setting = b.size["train"]
    B, T = setting["batch"], setting["seq"]
    inputs = [b.ids(B, T, seed) for seed in (21, 22)]
    turn = {"i": 0}

    def make(model, batch):
        def fn():
            turn["i"] += 1
            ids = inputs[turn["i"] % len(inputs)][:batch]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return fn

    compile_s = {}

    def measure(model, batch, name):
        model.train()
        mem: dict = {}
        try:
            compile_s[name] = b.first_call(model, make(b.fast(model), batch), name, f"train_b{batch}_s{T}")
            with peak_memory(b.device, mem, "peak"):
                ms, times = b.clock.median(make(b.fast(model), batch), b.size["train_warmup"], b.size["train_repeats"])
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()
        return ms, times, mem["peak"]

    batch = B
    while True:  # the dense model needs the most memory: find a batch it can run, use it for all
        try:
            dense_ms, dense_all, dense_peak = measure(b.dense, batch, "dense")
            break
        except _oom_types():
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
            if batch == 1:
                raise
            print(f"train: OOM at batch {batch}, trying {batch // 2}", flush=True)
            batch //= 2
    dense_flops = 3 * model_flops(b.shape, batch, T, None, T)
    for router, (model, _nominal, _) in b.mods.items():
        mod_ms, mod_all, mod_peak = measure(model, batch, router)
        kept = mean_kept(model)
        goal = setting["goals"].get(router)
        b.add(
            dict(
                scenario=f"train_b{batch}_s{T}",
                router=router,
                batch=batch,
                requested_batch=B,
                seq=T,
                dense_ms=dense_ms,
                mod_ms=mod_ms,
                speedup=dense_ms / mod_ms,
                ideal_speedup=dense_flops / (3 * model_flops(b.shape, batch, T, kept, T)),
                ideal_basis="flops",
                kept_fraction=kept,
                goal=goal,
                met=None if goal is None else dense_ms / mod_ms >= goal,
                dense_peak_bytes=dense_peak,
                mod_peak_bytes=mod_peak,
                dense_times_ms=dense_all,
                mod_times_ms=mod_all,
                **compile_fields(b, model, compile_s.get("dense"), compile_s.get(router)),
            )
        )


# --------------------------------------------------------------------------------------------
# Profile (optional): where MoD time goes, with host syncs counted
# --------------------------------------------------------------------------------------------

SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "cudaMemcpyAsync",
)


def _prefill_case(b: Bench, model, setting: dict):
    """Two prefills on one prompt, after one warm-up prefill on it."""
    ids = b.ids(setting["batch"], setting["seq"], 31)

    def one():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    one()

    def run():
        for _ in range(2):
            one()

    return run, 2


def _decode_case(b: Bench, model, setting: dict):
    """Eight decode steps after an unprofiled prefill of a prompt no timed run used, so that
    shape-keyed caches miss here as they would for a new request."""
    from transformers import DynamicCache

    steps = 8
    ids = b.ids(setting["batch"], setting["context"], 32)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        token = (
            model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )

    def run():
        nonlocal token
        with torch.inference_mode():
            for _ in range(steps):
                token = (
                    model(input_ids=token, **cache_kwarg(model, cache), use_cache=True)
                    .logits[:, -1]
                    .argmax(-1, keepdim=True)
                )

    return run, steps


def run_profile(b: Bench, path: str) -> None:
    """Profile prefill and decode of every model; write kernel tables (and, for decode, host-time
    tables) to `path` and a per-step summary (wall, kernel time, sync counts) to the records."""
    from torch.profiler import ProfilerActivity, profile

    cuda = b.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = int(b.args.profile_rows)
    cases = []
    for name, model in [("dense", b.dense)] + [(r, m) for r, (m, _, _) in b.mods.items()]:
        cases += [(f"prefill_b{s['batch']}_s{s['seq']}", name, model, _prefill_case, s) for s in b.size["prefill"]]
        cases += [
            (f"decode_b{s['batch']}_ctx{s['context']}", name, model, _decode_case, s)
            for s in b.size["decode"][: b.size["eager_decode"]]
        ]
    summary = []
    with open(path, "w") as fh:
        for scenario, name, model, make_case, setting in cases:
            run, steps = make_case(b, model, setting)
            b.clock.sync()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                run()
                b.clock.sync()
                wall = (time.perf_counter() - t0) * 1e3
            averages = prof.key_averages()
            device_us = sum(
                getattr(e, "self_device_time_total", 0)
                for e in averages
                if str(getattr(e, "device_type", "")).endswith("CUDA")
            )
            syncs = {e.key: e.count // steps for e in averages if e.key in SYNC_EVENTS}
            row = dict(
                scenario=scenario,
                model=name,
                steps=steps,
                wall_ms_per_step=wall / steps,
                kernel_ms_per_step=device_us / 1e3 / steps,
                per_step_counts=syncs,
            )
            summary.append(row)
            fh.write(f"\n===== {scenario} / {name}: {json.dumps(row)}\n")
            fh.write(averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows))
            if scenario.startswith("decode") and cuda:
                fh.write(f"\n----- {scenario} / {name}, by host (CPU) time\n")
                fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
            fh.write("\n")
            print(
                f"profile {scenario:>20s} {name:>12s}: wall {wall / steps:8.2f} ms/step, "
                f"kernels {device_us / 1e3 / steps:8.2f} ms/step, counts/step {syncs}",
                flush=True,
            )
    b.records.append({"scenario": "profile_summary", "router": None, "rows": summary, **b.env})
    if b.args.out:
        write_json(b.args.out, b.records)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

HEADER = f"{'scenario':<24} {'router':<18} {'dense_ms':>10} {'mod_ms':>10} {'speedup':>8} {'ideal':>7} {'goal':>12} {'met?':>5}"


def format_row(r: dict) -> str:
    goal = r.get("goal")
    if goal is None:
        goal_text = "-"
    elif r.get("goal_kind") == "router_overhead<=":
        goal_text = f"rtr<={goal:.0%}"
    else:
        goal_text = f">={goal:.2f}x"
    met = r.get("met")
    line = (
        f"{r['scenario']:<24} {r['router']:<18} {r['dense_ms']:>10.2f} {r['mod_ms']:>10.2f} "
        f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>6.2f}x {goal_text:>12} "
        f"{'-' if met is None else ('yes' if met else 'NO'):>5}"
    )
    extra = []
    if r.get("kept_fraction") is not None:
        extra.append(f"kept {r['kept_fraction']:.3f}")
    if "router_overhead" in r:
        extra.append(
            f"router {r['route_ms']:.3f} ms = {r['router_overhead']:.1%} of dense layer; "
            f"mask {r['mask_ms']:.3f} ms; layer-on-subset {r['subset_layer_ms']:.3f} ms; "
            f"other {r['other_ms']:.3f} ms"
        )
    if "dense_kv_bytes" in r:
        kv_goal = r.get("kv_goal")
        kv = (
            f"tok/s {r['dense_tokens_per_s']:.0f} -> {r['mod_tokens_per_s']:.0f}; KV "
            f"{r['dense_kv_bytes'] / 2**20:.1f} -> {r['mod_kv_bytes'] / 2**20:.1f} MiB ({r['kv_ratio']:.2f}x"
        )
        if kv_goal is not None:
            kv += f", goal <={kv_goal}: {'yes' if r['kv_met'] else 'NO'}"
        kv += ")"
        if r.get("mod_ms_fresh_prompt") is not None:
            kv += (
                f"; fresh prompts: {r['dense_ms_fresh_prompt']:.1f} vs {r['mod_ms_fresh_prompt']:.1f} ms "
                f"({r['speedup_fresh_prompt']:.2f}x)"
            )
        if r.get("slot_fraction") is not None:
            kv += f"; cache slots {r['slot_fraction']:.3f} of tokens (filler included)"
        extra.append(kv)
    if "kv_budget_bytes" in r:
        extra.append(
            f"K/V budget {_size(r['kv_budget_bytes'])}: batch {r['dense_batch']} -> {r['mod_batch']} (K/V per row "
            f"{_size(r['dense_kv_bytes_per_row'])} -> {_size(r['mod_kv_bytes_per_row'])}, "
            f"{r['kv_row_ratio']:.2f}x); tok/s {r['dense_tokens_per_s']:.0f} -> {r['mod_tokens_per_s']:.0f}; "
            f"allocated {_size(r['dense_kv_allocated_bytes'])} / {_size(r['mod_kv_allocated_bytes'])}"
            + (
                f"; peak above resident, prefill {_size(r['dense_prefill_peak_bytes'])} -> "
                f"{_size(r['mod_prefill_peak_bytes'])}, decode beyond K/V {_size(r['dense_decode_peak_bytes'])} -> "
                f"{_size(r['mod_decode_peak_bytes'])}"
                if r.get("mod_prefill_peak_bytes") is not None and r.get("dense_prefill_peak_bytes") is not None
                else ""
            )
            + (f"; {'; '.join(r['events'])}" if r.get("events") else "")
        )
    if "tokens_per_round" in r:
        extra.append(
            f"K {r['k']}, draft {r['draft']}: acceptance {r['acceptance']:.3f}, {r['tokens_per_round']:.2f} "
            f"tokens/round; tok/s {r['dense_tokens_per_s']:.0f} -> {r['mod_tokens_per_s']:.0f}; leading "
            f"tokens as dense {r['same_prefix_as_dense']:.3f} (worst row {r['same_prefix_worst_row']:.3f}); "
            f"branches {r['branches']}"
        )
        if "hf_assisted_ms" in r:
            extra.append(
                f"transformers assisted decoding (this model as assistant): {r['hf_assisted_ms']:.1f} ms vs plain "
                f"generate {r['hf_plain_ms']:.1f} ms ({r['hf_assisted_speedup']:.2f}x), same tokens "
                f"{r['hf_assisted_same_tokens']}"
            )
    if "tokens_as_select" in r:
        same = r["tokens_as_select"]
        extra.append(
            f"branches {r['branches']} ({r['captured_as']}): {r['mod_ms_per_step']:.3f} ms/step vs dense "
            f"{r['dense_ms_per_step']:.3f}; tokens as select (teacher-forced) {'-' if same is None else f'{same:.3f}'}"
        )
    if "mod_teacher_forced_agreement" in r:
        extra.append(
            f"branches {r['branches']}, decode kernel {r.get('decode_kernel')}, flash ran {r['flash_decode']}; tokens as eager (teacher-forced): dense "
            f"{r['dense_teacher_forced_agreement']:.3f}, MoD {r['mod_teacher_forced_agreement']:.3f} "
            f"(worst row {r['dense_worst_row_agreement']:.3f}, {r['mod_worst_row_agreement']:.3f})"
        )
    if r.get("mod_host_ms") is not None and "router_overhead" not in r:
        extra.append(f"host {r['dense_host_ms']:.1f} -> {r['mod_host_ms']:.1f} ms")
    if r.get("dense_peak_bytes") is not None:
        extra.append(f"peak {r['dense_peak_bytes'] / 2**30:.2f} -> {r['mod_peak_bytes'] / 2**30:.2f} GiB")
    return line + ("\n" + " " * 24 + "; ".join(extra) if extra else "")


def print_table(records: list[dict]) -> None:
    print("\n" + HEADER)
    print("-" * len(HEADER))
    for r in records:
        if "dense_ms" in r:
            print(format_row(r))


def write_json(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(records, fh, indent=1)
    os.replace(tmp, path)


def environment(device: torch.device, dtype: torch.dtype, model_cfg: dict, tiny: bool) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(
        gpu=gpu,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        attn_implementation="sdpa",
        torch=torch.__version__,
        transformers=transformers.__version__,
        modadapt=modadapt.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        size="tiny" if tiny else "full",
        model_config=model_cfg,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes: a CPU smoke test in seconds")
    parser.add_argument("--out", help="write the JSON records here (rewritten after every scenario)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=f"comma list of {', '.join(ROUTERS)}")
    parser.add_argument("--profile", metavar="PATH", help="also profile prefill and decode; write tables to PATH")
    parser.add_argument("--profile-rows", default=25, type=int, help="rows per profiler table")
    parser.add_argument(
        "--sdpa-backends",
        default=None,
        help="restrict SDPA to these backends for dense and MoD alike, e.g. "
        "'flash,efficient,math' (default: PyTorch's choice, cuDNN first on H100)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="prefill and training run dense and MoD through torch.compile (fullgraph for dense "
        "and topk; threshold-p syncs with the host in every MoD layer, so it compiles with graph "
        "breaks); decode and the layer breakdown stay eager. The compiling first call of each "
        "shape is timed apart and kept out of the measurements",
    )
    parser.add_argument(
        "--pack-bucket",
        type=int,
        default=None,
        help="ModConfig.pack_bucket: round packed token counts of calls without a KV cache (prefill, "
        "training) up to a multiple of N, so that --compile compiles once per bucket (default: exact counts)",
    )
    parser.add_argument(
        "--pack-reserve",
        type=pack_reserve_value,
        default=None,
        metavar="SHARE|auto",
        help="ModConfig.pack_reserve: pack each MoD layer of a call without a KV cache into this share "
        "of its tokens ('auto': each layer's own, learned from what it kept), with no host sync per "
        "layer (a forward that overflows runs again exactly; prefill records count those runs in "
        "pack_reruns). Default: exact counts",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. 'max-autotune-no-cudagraphs' (default: PyTorch's default)",
    )
    parser.add_argument(
        "--graph-branches",
        default="auto",
        choices=BRANCHES,
        help="decode_graphs, decode_kv_budget, decode_speculative: how MoD layers branch in the captured step "
        "(GraphedDecoder's branches)",
    )
    parser.add_argument(
        "--decode-kernel",
        default="split-kv",
        choices=("split-kv", "flash"),
        help="the graphed decoders' one-token attention (modadapt.decoding.static_cache.DECODE_KERNEL): "
        "the split-KV Triton kernel, or torch's flash with used lengths",
    )
    parser.add_argument(
        "--linear-kernel",
        default="triton",
        choices=("triton", "cublas"),
        help="the graphed decoders' few-row linear layers (modadapt.decoding.decode_linear.LINEAR_KERNEL): "
        "the Triton kernel where it beats cuBLAS, or F.linear throughout",
    )
    parser.add_argument(
        "--branch-modes",
        default=None,
        help="decode_branches: comma list of the branch modes to time (default: every mode this torch captures "
        "but auto, which is one of them)",
    )
    parser.add_argument(
        "--graph-compile",
        action="store_true",
        help="decode_graphs, decode_speculative, decode_kv_budget: GraphedDecoder(compile=True), the captured step's layers "
        "through torch.compile (inductor) so that their small kernels fuse; each shape compiles in the "
        "first prefill, timed apart (first_call_s), outside the warm-up and repeats",
    )
    parser.add_argument(
        "--kv-budget-gib",
        type=float,
        default=None,
        help="decode_kv_budget: the K/V budget in GiB (default: 60; --tiny: 1 MiB)",
    )
    parser.add_argument(
        "--speculate-k",
        default=None,
        help="decode_speculative: comma list of K (draft tokens per verification); default 2,4,6 (--tiny: 2)",
    )
    parser.add_argument(
        "--draft",
        action="append",
        default=None,
        help="decode_speculative: a draft depth (modadapt.decoding.Draft string: 'routers', "
        "'margin=0.5', 'skip=all', 'skip=2,6;margin=0.25'); repeat to sweep (default: GraphedDecoder's, skip=all)",
    )
    parser.add_argument(
        "--speculate-model",
        action="append",
        default=None,
        metavar="DIR",
        help="decode_speculative: a converted model saved with modadapt.save (trained: its acceptance "
        "is what matters), verified by its own dense computation; repeat for several. Given, only "
        "these models are measured",
    )
    parser.add_argument(
        "--speculate-text",
        default=None,
        metavar="FILE",
        help="decode_speculative: prompts from this .txt(.gz), tokenized by the tokenizer saved with "
        "each --speculate-model (default: random tokens)",
    )
    parser.add_argument(
        "--speculate-prompts",
        type=int,
        default=None,
        metavar="N",
        help="decode_speculative: batch 1 decodes N prompts in turn and adds up their times (default: "
        "the size's, 8: the windows batch 8 decodes)",
    )
    parser.add_argument(
        "--speculate-context",
        type=int,
        default=None,
        help="decode_speculative: prompt tokens at every batch (default: the size's; a loaded model "
        "trained on shorter blocks wants fewer)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip scenarios that would start after this many seconds (partial JSON is kept)",
    )
    parser.add_argument(
        "--decode-shapes",
        help="the decode scenarios: only these of the size's shapes, as BATCHxCONTEXT (comma list, e.g. 1x2048,32x2048)",
    )
    args = parser.parse_args(argv)
    from modadapt.decoding import decode_linear, static_cache

    static_cache.DECODE_KERNEL = args.decode_kernel
    decode_linear.LINEAR_KERNEL = args.linear_kernel
    if args.speculate_prompts is not None and args.speculate_prompts < 1:
        parser.error(f"--speculate-prompts must be >= 1, got {args.speculate_prompts}")

    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("no GPU: the full-size benchmark needs one; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    size = TINY if args.tiny else FULL
    if args.decode_shapes:
        shapes = {f"{d['batch']}x{d['context']}": d for d in size["decode"]}
        asked = [a for a in args.decode_shapes.split(",") if a]
        bad = [a for a in asked if a not in shapes]
        if bad:
            parser.error(f"--decode-shapes: {', '.join(bad)} not among this size's {', '.join(shapes)}")
        size = {**size, "decode": [shapes[a] for a in asked]}
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test: one thread is steadier on a shared machine
    dtype = torch.bfloat16
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if args.branch_modes:
        bad = sorted(set(args.branch_modes.split(",")) - set(BRANCHES))
        if bad:
            parser.error(f"unknown branch mode {bad}; choose from {', '.join(BRANCHES)}")
    routers = [r for r in args.routers.split(",") if r]
    unknown += sorted(set(routers) - set(ROUTERS))
    if unknown:
        parser.error(f"unknown scenario/router {unknown}")

    env = environment(device, dtype, size["model"], args.tiny)
    env["sdpa_backends"] = args.sdpa_backends or "default"
    env["compile"] = bool(args.compile)
    env["compile_mode"] = (args.compile_mode or "default") if args.compile else None
    env["pack_bucket"] = args.pack_bucket
    env["pack_reserve"] = args.pack_reserve
    env["graph_compile"] = bool(args.graph_compile)
    with contextlib.ExitStack() as stack:
        if args.sdpa_backends:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            names = {
                "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH,
                "cudnn": SDPBackend.CUDNN_ATTENTION,
            }
            bad = sorted(set(args.sdpa_backends.split(",")) - set(names))
            if bad:
                parser.error(f"unknown SDPA backend {bad}; choose from {', '.join(names)}")
            stack.enter_context(sdpa_kernel([names[n] for n in args.sdpa_backends.split(",")]))
        run(args, size, device, dtype, env, scenarios, routers, t_start)
    return 0


def compile_models(b: Bench, mode: str | None, scenarios: list[str]) -> None:
    """Wrap dense and every MoD model in torch.compile for prefill and training.

    fullgraph=True for dense and `topk` (static top-k: no host sync, no graph break); `threshold-p`
    packs a data-dependent keep mask (one host sync per MoD layer), so it compiles with graph
    breaks. dynamic=False: each prefill/training shape gets its own graph (the k of top-k is a
    Python int of the sequence length; for `threshold-p` each packed size compiles anew, fine for
    the benchmark's fixed inputs). torch's automatic dynamic shapes would make the packed size
    symbolic instead (tests/test_compile.py, Dynamo level), but inductor in torch 2.11 fails on
    it (NameError for a size symbol in the generated code, H200 2026-11-30). Compilation is lazy: the first call of each shape, grad
    mode and train/eval mode compiles, and `Bench.first_call` times it outside the measurements."""
    import torch._dynamo

    # Dense and MoD share LlamaForCausalLM.forward: every (model, shape, mode) is a cache entry of
    # that one code object, more than the default limit of 8 when all routers and shapes run.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    kwargs = {"dynamic": False} | ({"mode": mode} if mode else {})
    b.compiled[id(b.dense)] = torch.compile(b.dense, fullgraph=True, **kwargs)
    for router, (model, _, _) in b.mods.items():
        b.compiled[id(model)] = torch.compile(model, fullgraph=router == "topk", **kwargs)
    full = ", ".join(f"{r}: fullgraph={r == 'topk'}" for r in b.mods)
    print(
        f"# --compile (mode {mode or 'default'}, dynamic=False): prefill and train compiled "
        f"(dense: fullgraph=True; {full})",
        flush=True,
    )
    eager = [s for s in scenarios if s in ("decode", "layer")]
    if eager:
        print(
            f"# --compile: {', '.join(eager)} stay eager (decode: the DynamicCache MoD layers keep "
            "is not traceable yet; layer: the breakdown times single calls)",
            flush=True,
        )


def run(args, size, device, dtype, env, scenarios, routers, t_start) -> None:
    print(
        f"# {env['gpu'] or env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['dtype']}, sdpa, {env['date']}",
        flush=True,
    )
    dense = build_dense(size["model"], device, dtype)
    shape = Shape.of(dense)
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"# dense Llama: {n_params / 1e9:.3f}B parameters, {shape.L} layers", flush=True)
    calib = torch.Generator(device="cpu").manual_seed(99)
    calib_ids = torch.randint(
        0, shape.V, (size["calibration"]["batch"], size["calibration"]["seq"]), generator=calib
    ).to(device)
    mods = {}
    for router in routers:
        seed = 100 + list(ROUTERS).index(router.removesuffix("-padded"))  # a padded twin routes alike
        model, nominal, reached = make_mod(
            dense, router, calib_ids, seed=seed, pack_bucket=args.pack_bucket, pack_reserve=args.pack_reserve
        )
        mods[router] = (model, nominal, reached)
        shape.mod_layers = list(model._modadapt_state.layer_indices)
        print(
            f"# {router}: MoD layers {shape.mod_layers}; causal rule calibrated to keep {nominal} "
            f"(reached per layer on the calibration batch: {', '.join(f'{x:.3f}' for x in reached)})",
            flush=True,
        )
    env = {
        **env,
        "parameters": n_params,
        "mod_layers": shape.mod_layers,
        "calibrated_fraction": {r: mods[r][1] for r in mods},
    }
    clock = Clock(device)
    bench = Bench(args, size, device, dtype, clock, dense, mods, shape, env)
    if args.compile:
        compile_models(bench, args.compile_mode, scenarios)
    print(HEADER, flush=True)
    runners = {
        "check": run_packed_check,
        "prefill": run_prefill,
        "layer": run_layer,
        "decode_layer": run_decode_layer,
        "decode": run_decode,
        "decode_graphs": run_decode_graphs,
        "decode_branches": run_decode_branches,
        "decode_kv_budget": run_decode_kv_budget,
        "decode_speculative": run_decode_speculative,
        "train": run_train,
    }
    for name in scenarios:
        elapsed = time.perf_counter() - t_start
        if args.budget_s is not None and elapsed > args.budget_s:
            print(f"# skipping {name}: {elapsed:.0f} s elapsed, budget {args.budget_s:.0f} s", flush=True)
            continue
        t0 = time.perf_counter()
        runners[name](bench)
        print(f"# {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile and (args.budget_s is None or time.perf_counter() - t_start <= args.budget_s):
        run_profile(bench, args.profile)
    print_table(bench.records)
    print(f"# total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
