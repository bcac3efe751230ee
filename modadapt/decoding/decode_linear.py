"""Linear layers at a decode step's few rows, in Triton: the weights read at bandwidth.

A decode step multiplies a few rows (the batch's tokens) by every weight matrix once: it is bound
by reading the weights. cuBLAS reads some of them far below the GPU's bandwidth at such shapes
(issue 17's profile, 1.1B Llama on an H200 at batch 1: 56 us per layer for 116 MB, 27 us at the
bound; the 2 MB k/v projections at 0.4 TB/s), and that is most of a dense step. Here one program
computes `block_n` outputs of every row, streaming those weight rows once; where that gives too
few programs to keep every multiprocessor's loads in flight (narrow layers: k/v projections, a
router's score), the reduction dimension is split over programs too, and a second kernel adds
the float32 partial sums (1.4 us in the step; folding the sum into the first kernel, its last
program per output block adding them, measured no faster, and would share counters between
concurrent streams). One launch may compute up to `GROUP` weights of one input (a layer's q/k/v
projections, its gate and up projections), each weight's outputs by its own programs, into its
own tensor: the launch, its ramp and its tail are paid once (`group_wins`).

Ops (so `torch.compile` treats each as one opaque call): `linear(x, weight, bias)` is
`modadapt::decode_linear`, `linears(x, weights, biases)` is `modadapt::decode_linears` (one
launch), `partials(x, weights)` is `modadapt::decode_linear_partials` (a split reduction's
partial sums, which compiled steps add in their own fused kernels: `fuse_linears`). Each runs the
kernel where it beats cuBLAS (`wins`, `group_wins`) and `F.linear` elsewhere, decided at run time.
`FewRowsLinear` is the torch function mode that sends a decode step's `F.linear` calls that the
kernel `accepts` (half precision, at most `MAX_ROWS` rows) to the op. `reference` is the
computation in torch that the tests hold the kernel to.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ModAdaptError
from .fallback import tried
from .static_cache import multiprocessors

try:  # Triton ships with torch's CUDA wheels; without it cuBLAS runs as before
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without Triton
    triton = None

#: `"triton"`: decode steps send their few-row linear layers to the kernel (`FewRowsLinear`) where
#: it runs; `"cublas"`: `F.linear` as before (for comparison). Read when a step is built.
LINEAR_KERNEL = "triton"
LINEAR_KERNELS = ("triton", "cublas")
#: Rows up to which the kernel may run (above, a GEMM's compute starts to matter, and cuBLAS's tiles win).
MAX_ROWS = 64
#: Where it runs (`wins`), measured against cuBLAS on an H200 (benchmarks/decode_linear.py,
#: benchmarks/README.md): narrow outputs (k/v projections of 2 MB: 3.9 against 5.2 us; a router's
#: score: 2.9 against 4.1) at any row count, and few rows of a long reduction (the MLP's down
#: projection at 1-8 rows: 8.0 against 11.1 us). Square and wide layers tie or lose (q/o, gate/up,
#: the LM head) and stay with cuBLAS.
NARROW = 512
FEW_ROWS = 8
#: Weights of one input that one launch computes together (`linears`; a step's q/k/v projections,
#: an MLP's gate and up projections: `fuse_linears` merges them in compiled steps).
GROUP = 3
#: Rows up to which one launch for a group beats cuBLAS on each of its weights (measured on an
#: H200, benchmarks/decode_linear.py --groups, 10 calls per graph replay): q/k/v of speed.py's
#: 1.1B Llama 6.3-7.8 us at 1-32 rows against 12.8-13.9 (cuBLAS on q, the kernel on k and v),
#: gate/up 18.3-19.5 against 21.5-22.4; at 64 rows gate/up loses (27.6 against 23.4).
GROUP_ROWS = 32
#: Outputs up to which a compiled step computes a layer as a reduction of its own graph
#: (`fuse_linears.reduce_narrow`: a MoD router's score, fused into its causal rule's kernel).
REDUCED = 8
# Tuned on an H200 (benchmarks/decode_linear.py): 128 reduction elements per step, 3 stages,
# 64 outputs per program where the outputs are many (fewer for narrow layers, so that more
# programs share the weights' reads), 2 programs per multiprocessor before splitting the reduction.
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 2
# A group of weights (`linears`): one program per multiprocessor, 32 outputs per program below
# 8192 outputs in all (q/k/v at 1-64 rows: 6.4-13.0 us against 6.9-16.1 with one weight's tuning).
GROUP_PROGRAMS_PER_SM = 1
SUM_BLOCK = 128  # outputs per program of the split reduction's sum
BLOCK_N = None  # None: by the outputs (`block_n`); a number: that (benchmarks/decode_linear.py sweeps it)
# Per (device, dtype): whether the kernel ran (True) or raised the first time (False: F.linear from then on)
_RAN: dict[tuple, bool] = {}
# Off CUDA: the dtypes run in Triton's interpreter (`TRITON_INTERPRET=1`, the CPU tests), else none
_INTERPRETED = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def accepts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel can compute `F.linear(x, weight, bias)`: Triton on CUDA in half
    precision (or float16 in Triton's interpreter, whose bfloat16 is not exact), a 2-D contiguous
    weight of x's dtype and device, at most `MAX_ROWS` rows of x, and no autograd to record.
    Where it is also faster than cuBLAS (`wins`, `group_wins`) is the op's choice, at run time."""
    return (
        triton is not None
        and x.dtype in ((torch.float16, torch.bfloat16) if x.is_cuda else _INTERPRETED)
        and weight.dtype == x.dtype
        and weight.device == x.device
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1] > 0
        and x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and (bias is None or (bias.dtype == x.dtype and bias.dim() == 1 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def wins(rows: int, n: int, k: int) -> bool:
    """Whether the kernel beats cuBLAS for `rows` rows of an `n` x `k` weight (see `NARROW`)."""
    return n <= NARROW or (rows <= FEW_ROWS and k >= 2 * n)


def group_wins(rows: int, ns: list, k: int) -> bool:
    """Whether one launch for weights of `ns` outputs each (one input of `k`) beats cuBLAS on each
    (see `GROUP_ROWS`)."""
    return rows <= GROUP_ROWS or all(wins(rows, n, k) for n in ns)


def block_n(n: int, grouped: bool = False) -> int:
    """Outputs per program for `n` outputs: 64 for wide layers, 32 from 256 outputs, else 16;
    for a group of weights (`n` their total), 64 from 8192 outputs, else 32."""
    if BLOCK_N is not None:
        return BLOCK_N
    if grouped:
        return 64 if n >= 8192 else 32
    return 64 if n >= 2048 else 32 if n >= 256 else 16


def plan(rows: int, ns: list, k: int, multiprocessors: int) -> tuple[int, int]:
    """(programs along the outputs, splits of the reduction) for weights of `ns` outputs each
    (one input of `k`): each weight's own blocks of `block_n` of their total, the reduction split
    until the device holds `PROGRAMS_PER_SM` (`GROUP_PROGRAMS_PER_SM`) programs per
    multiprocessor, no split shorter than two `BLOCK_K` steps."""
    grouped = len(ns) > 1
    bn = block_n(sum(ns), grouped)
    blocks = sum(-(-n // bn) for n in ns)
    most = max(1, k // (2 * BLOCK_K))
    want = -(-(GROUP_PROGRAMS_PER_SM if grouped else PROGRAMS_PER_SM) * multiprocessors // blocks)
    return blocks, max(1, min(most, want))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes: float32 sums, rounded to x's dtype once."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def splits(rows: int, ns: list, k: int, device: torch.device) -> tuple[int, int, int]:
    """(programs along the outputs, reduction splits, reduction elements per split) on `device`:
    `plan`'s, the split rounded to whole `BLOCK_K` steps."""
    blocks, S = plan(rows, ns, k, multiprocessors(device) if device.type == "cuda" else 4)
    steps = -(-k // (S * BLOCK_K))  # BLOCK_K steps per split
    chunk = steps * BLOCK_K
    return blocks, -(-k // chunk), chunk


def _launch(x: torch.Tensor, weights: list, biases: list, partial: bool = False) -> list:
    """`F.linear(x, w, b)` for each weight of one input (at most `GROUP`), in one launch; with
    `partial`, each weight's float32 partial sums `[splits, rows, outputs]` instead (no bias:
    `fuse_linears` leaves adding them to inductor)."""
    if triton is None:
        raise ModAdaptError("the decode linear kernel needs Triton")
    G, K = len(weights), weights[0].shape[1]
    biases = list(biases) or [None] * G
    if not 1 <= G <= GROUP:
        raise ModAdaptError(f"the decode linear kernel takes 1 to {GROUP} weights of one input, got {G}")
    ns = [w.shape[0] for w in weights]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    blocks, S, chunk = splits(M, ns, K, x.device)
    if partial:
        outs = parts = [torch.empty(S, M, n, dtype=torch.float32, device=x.device) for n in ns]
    else:
        outs = [torch.empty(M, n, dtype=x.dtype, device=x.device) for n in ns]
        parts = [torch.empty(S, M, n, dtype=torch.float32, device=x.device) for n in ns] if S > 1 else outs
    if M == 0 or min(ns) == 0:
        return outs if partial else [o.view(*lead, n) for o, n in zip(outs, ns)]
    bn = block_n(sum(ns), G > 1)
    ends = list(itertools.accumulate(-(-n // bn) for n in ns))  # each weight's programs end here
    block_m = max(16, 1 << (M - 1).bit_length())
    pad = lambda items, fill: [*items, *[fill] * (GROUP - G)]  # noqa: E731 - unused slots: any valid tensor
    W, O, P, N, B = pad(weights, weights[0]), pad(outs, outs[0]), pad(parts, parts[0]), pad(ns, 0), pad(biases, None)
    has = [b is not None for b in B]
    B = [weights[0] if b is None else b for b in B]
    _linear_kernel[(blocks, S)](
        x2, *W, *B, *O, *P, *N, ends[0], ends[min(1, G - 1)], M, K, chunk, x2.stride(0),
        G=G, HB0=has[0], HB1=has[1], HB2=has[2], DIRECT=S == 1 and not partial,
        EVEN_K=K % chunk == 0 and chunk % BLOCK_K == 0, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if not partial:
        if S > 1:
            sums = list(itertools.accumulate(-(-n // SUM_BLOCK) for n in ns))
            _sum_kernel[(M, sums[-1])](
                *P, *B, *O, *N, sums[0], sums[min(1, G - 1)], M, G=G, HB0=has[0], HB1=has[1], HB2=has[2],
                S=S, S_PAD=max(2, 1 << (S - 1).bit_length()), BLOCK=SUM_BLOCK,
            )  # fmt: skip
        return [o.view(*lead, n) for o, n in zip(outs, ns)]
    return outs


def _run(x: torch.Tensor, weights: list, biases: list) -> list:
    """The kernel where it `wins` (or `group_wins`) and has not failed here, else `F.linear` per weight."""
    rows, k, ns = x.numel() // max(1, x.shape[-1]), x.shape[-1], [w.shape[0] for w in weights]
    fast = wins(rows, ns[0], k) if len(ns) == 1 else group_wins(rows, ns, k)
    # Where Triton cannot compile or launch it (the first call on such tensors), F.linear from then on
    # (decided here, inside the op: Dynamo does not guard on it, so nothing recompiles)
    key = (str(x.device), x.dtype)
    out = None
    if fast and _RAN.get(key) is not False:
        out = tried(_RAN, key, (Exception,), lambda: _launch(x, weights, biases))
    if out is None:
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return out


@torch.library.custom_op("modadapt::decode_linear", mutates_args=())
def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(x, [weight], [bias])[0]


@_decode_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("modadapt::decode_linears", mutates_args=())
def _decode_linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    return _run(x, weights, biases)


@_decode_linears.register_fake
def _(x, weights, biases):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.custom_op("modadapt::decode_linear_partials", mutates_args=())
def _decode_linear_partials(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    # If the kernel fails here: F.linear's result as the first partial sum and zeros as the rest
    # (the same outputs once summed)
    key = (str(x.device), x.dtype)
    out = None if _RAN.get(key) is False else tried(_RAN, key, (Exception,), lambda: _launch(x, weights, [], True))
    if out is not None:
        return out
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    S = splits(rows, [w.shape[0] for w in weights], k, x.device)[1]
    plain = [F.linear(x.reshape(rows, k), w).float() for w in weights]
    return [torch.cat([p[None], p.new_zeros(S - 1, *p.shape)]) for p in plain]


@_decode_linear_partials.register_fake
def _(x, weights):
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    S = splits(rows, [w.shape[0] for w in weights], k, x.device)[1]
    return [x.new_empty(S, rows, w.shape[0], dtype=torch.float32) for w in weights]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: by the kernel where it `wins` (check `accepts` first)."""
    return torch.ops.modadapt.decode_linear(x, weight, bias)


def linears(x: torch.Tensor, weights: list, biases: list | None = None) -> list:
    """`[F.linear(x, w, b) for w, b in zip(weights, biases)]` (at most `GROUP`, each `accepts`ed
    with x): by one launch of the kernel where it `group_wins`."""
    return torch.ops.modadapt.decode_linears(x, list(weights), list(biases or [None] * len(weights)))


def partials(x: torch.Tensor, weights: list) -> list:
    """Each weight's float32 partial sums `[splits, rows, outputs]` of the kernel's reduction
    (`splits`), whose sum over the first dimension is `F.linear(x, w)` (`fuse_linears` uses them
    where the reduction splits)."""
    return torch.ops.modadapt.decode_linear_partials(x, list(weights))


class FewRowsLinear(TorchFunctionMode):
    """Within it, `F.linear` calls that the kernel `accepts` go to `linear` (which runs the kernel
    where it `wins`, else `F.linear`); others run as they would. `GraphedDecoder` enters it
    around its decode steps (run, warmed up, captured), so the model itself is not changed; under
    `torch.compile` Dynamo traces the mode, each call is one opaque op in the compiled graph, and
    `fuse_linears` rewrites them there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}  # positional or by name
            x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
            if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and accepts(x, weight, bias):
                return linear(x, weight, bias)
        return func(*args, **kwargs)


if triton is not None:

    @triton.jit
    def _tile(
        X, W, BIAS, OUT, PART, pid, s, M, N, K, chunk, sxm,
        HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Outputs `pid * BLOCK_N...` of one weight (`N` x `K`) for every row, over reduction
        split `s`: into OUT (`[M, N]`), or as float32 partial sums into PART (`[splits, M, N]`)."""
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        n_in = n < N
        m_in = m < M
        lo = s * chunk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(lo, lo + chunk, BLOCK_K):
            k = k0 + kk
            if EVEN_K:
                x = tl.load(X + m[:, None] * sxm + k[None, :], mask=m_in[:, None], other=0.0)
                w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=n_in[:, None], other=0.0)
            else:
                k_in = k < K
                x = tl.load(X + m[:, None] * sxm + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
                w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=n_in[:, None] & k_in[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        mask = m_in[:, None] & n_in[None, :]
        if DIRECT:
            if HAS_BIAS:
                acc += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + m[:, None] * N + n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
        else:  # split s of the reduction: its float32 partial sums, which `_sum_kernel` adds
            tl.store(PART + (s * M + m[:, None]) * N + n[None, :], acc, mask=mask)

    @triton.jit
    def _linear_kernel(
        X, W0, W1, W2, B0, B1, B2, O0, O1, O2, P0, P1, P2, N0, N1, N2, E1, E2, M, K, chunk, sxm,
        G: tl.constexpr, HB0: tl.constexpr, HB1: tl.constexpr, HB2: tl.constexpr, DIRECT: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """`G` weights of one input: programs `[0, E1)` compute the first's outputs, `[E1, E2)`
        the second's, the rest the third's (each weight's own blocks, one launch)."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        if G == 1 or pid < E1:
            _tile(X, W0, B0, O0, P0, pid, s, M, N0, K, chunk, sxm,
                  HB0, DIRECT, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        elif G == 2 or pid < E2:
            _tile(X, W1, B1, O1, P1, pid - E1, s, M, N1, K, chunk, sxm,
                  HB1, DIRECT, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        else:
            _tile(X, W2, B2, O2, P2, pid - E2, s, M, N2, K, chunk, sxm,
                  HB2, DIRECT, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip

    @triton.jit
    def _sum_tile(
        PART, BIAS, OUT, m, blk, M, N,
        S: tl.constexpr, S_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        n = blk * BLOCK + tl.arange(0, BLOCK)
        s = tl.arange(0, S_PAD)
        n_in = n < N
        at = (s[:, None] * M + m) * N + n[None, :]
        part = tl.load(PART + at, mask=(s < S)[:, None] & n_in[None, :], other=0.0)
        out = tl.sum(part, 0)
        if HAS_BIAS:
            out += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)
        tl.store(OUT + m * N + n, out.to(OUT.dtype.element_ty), mask=n_in)

    @triton.jit
    def _sum_kernel(
        P0, P1, P2, B0, B1, B2, O0, O1, O2, N0, N1, N2, F1, F2, M,
        G: tl.constexpr, HB0: tl.constexpr, HB1: tl.constexpr, HB2: tl.constexpr,
        S: tl.constexpr, S_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The split reduction's partial sums added, each weight's outputs by its own programs."""
        m = tl.program_id(0)
        blk = tl.program_id(1)
        if G == 1 or blk < F1:
            _sum_tile(P0, B0, O0, m, blk, M, N0, S, S_PAD, HB0, BLOCK)
        elif G == 2 or blk < F2:
            _sum_tile(P1, B1, O1, m, blk - F1, M, N1, S, S_PAD, HB1, BLOCK)
        else:
            _sum_tile(P2, B2, O2, m, blk - F2, M, N2, S, S_PAD, HB2, BLOCK)
