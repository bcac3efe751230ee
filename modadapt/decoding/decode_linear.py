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
concurrent streams).

`linear(x, weight, bias)` is registered as the op `modadapt::decode_linear` (so `torch.compile`
treats it as one opaque call), and `FewRowsLinear` is the torch function mode that sends a decode
step's `F.linear` calls of at most `MAX_ROWS` rows to it where `available`. `reference` is the
computation in torch that the tests hold the kernel to.
"""

from __future__ import annotations

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
# Tuned on an H200 (benchmarks/decode_linear.py): 128 reduction elements per step, 3 stages,
# 64 outputs per program where the outputs are many (fewer for narrow layers, so that more
# programs share the weights' reads), 2 programs per multiprocessor before splitting the reduction.
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 2
SUM_BLOCK = 128  # outputs per program of the split reduction's sum
BLOCK_N = None  # None: by the outputs (`block_n`); a number: that (benchmarks/decode_linear.py sweeps it)
# Per (device, dtype): whether the kernel ran (True) or raised the first time (False: F.linear from then on)
_RAN: dict[tuple, bool] = {}
# Off CUDA: the dtypes run in Triton's interpreter (`TRITON_INTERPRET=1`, the CPU tests), else none
_INTERPRETED = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def available(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel computes `F.linear(x, weight, bias)`: Triton on CUDA in half precision
    (or float16 in Triton's interpreter, whose bfloat16 is not exact), a 2-D contiguous weight of
    x's dtype and device, at most `MAX_ROWS` rows of x, a shape where it `wins`, and no autograd
    to record."""
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
        and wins(x.numel() // max(1, x.shape[-1]), *weight.shape)
        and (bias is None or (bias.dtype == x.dtype and bias.dim() == 1 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def wins(rows: int, n: int, k: int) -> bool:
    """Whether the kernel beats cuBLAS for `rows` rows of an `n` x `k` weight (see `NARROW`)."""
    return n <= NARROW or (rows <= FEW_ROWS and k >= 2 * n)


def block_n(n: int) -> int:
    """Outputs per program: 64 for wide layers, 32 from 256 outputs, else 16."""
    if BLOCK_N is not None:
        return BLOCK_N
    return 64 if n >= 2048 else 32 if n >= 256 else 16


def plan(rows: int, n: int, k: int, multiprocessors: int) -> tuple[int, int]:
    """(programs along the outputs, splits of the reduction): split until the device holds
    `PROGRAMS_PER_SM` programs per multiprocessor, no split shorter than two `BLOCK_K` steps."""
    blocks = -(-n // block_n(n))
    most = max(1, k // (2 * BLOCK_K))
    want = -(-PROGRAMS_PER_SM * multiprocessors // blocks)
    return blocks, max(1, min(most, want))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes: float32 sums, rounded to x's dtype once."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if triton is None:
        raise ModAdaptError("the decode linear kernel needs Triton")
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    blocks, S = plan(M, N, K, multiprocessors(x.device) if x.is_cuda else 4)
    chunk = -(-K // S)
    chunk = -(-chunk // BLOCK_K) * BLOCK_K
    S = -(-K // chunk)
    block_m = max(16, 1 << (M - 1).bit_length())
    part = out if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    _linear_kernel[(blocks, S)](
        x2, weight, bias if has_bias else weight, part, M, N, K, chunk, x2.stride(0),
        HAS_BIAS=has_bias and S == 1, DIRECT=S == 1, EVEN_K=K % chunk == 0 and chunk % BLOCK_K == 0,
        BLOCK_M=block_m, BLOCK_N=block_n(N), BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if S > 1:
        _sum_kernel[(M, -(-N // SUM_BLOCK))](
            part, bias if has_bias else part, out, M, N, S=S, S_PAD=max(2, 1 << (S - 1).bit_length()),
            HAS_BIAS=has_bias, BLOCK=SUM_BLOCK,
        )  # fmt: skip
    return out.view(*lead, N)


@torch.library.custom_op("modadapt::decode_linear", mutates_args=())
def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Where Triton cannot compile or launch it (the first call on such tensors), F.linear from then on
    # (decided here, inside the op: Dynamo does not guard on it, so nothing recompiles)
    key = (str(x.device), x.dtype)
    out = None if _RAN.get(key) is False else tried(_RAN, key, (Exception,), lambda: _launch(x, weight, bias))
    return F.linear(x, weight, bias) if out is None else out


@_decode_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the kernel (check `available` first)."""
    return torch.ops.modadapt.decode_linear(x, weight, bias)


class FewRowsLinear(TorchFunctionMode):
    """Within it, `F.linear` calls that `available` accepts run the kernel; others run as they
    would. `GraphedDecoder` enters it around its decode steps (run, warmed up, captured), so the
    model itself is not changed; under `torch.compile` Dynamo traces the mode, and the kernel
    is one opaque op in the compiled graph."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            named = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}  # positional or by name
            x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
            if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and available(x, weight, bias):
                return linear(x, weight, bias)
        return func(*args, **kwargs)


if triton is not None:

    @triton.jit
    def _linear_kernel(
        X, W, BIAS, OUT, M, N, K, chunk, sxm,
        HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        s = tl.program_id(1)
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
            tl.store(OUT + (s * M + m[:, None]) * N + n[None, :], acc, mask=mask)

    @triton.jit
    def _sum_kernel(
        PART, BIAS, OUT, M, N, S: tl.constexpr, S_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
    ):
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        s = tl.arange(0, S_PAD)
        n_in = n < N
        part = tl.load(PART + (s[:, None] * M + m) * N + n[None, :], mask=(s < S)[:, None] & n_in[None, :], other=0.0)
        total = tl.sum(part, 0)
        if HAS_BIAS:
            total += tl.load(BIAS + n, mask=n_in, other=0.0).to(tl.float32)
        tl.store(OUT + m * N + n, total.to(OUT.dtype.element_ty), mask=n_in)
