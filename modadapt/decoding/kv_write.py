"""A decode token's K and V into the static cache in one Triton kernel.

`StaticCache.update` writes each row's new K/V at the row's length. As two `scatter_` calls that
is two kernels per layer and step, 2.4 us each at batch 1 and 4.2 at batch 32 on an H200 (issue
17's profile, 1.1B Llama): at decode's sizes a kernel costs its launch, not its bytes. Here one
program per (row, K/V head) copies that head's key and value. This is the uncompiled step's
write; a compiled step (`compile=True`) traces `StaticCache.update` as index writes instead, which
inductor computes in the kernel that makes the new K/V (no launch of its own).
"""

from __future__ import annotations

import os

import torch

from ..errors import ModAdaptError
from .fallback import tried

try:  # Triton ships with torch's CUDA wheels; without it the scatters run as before
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without Triton
    triton = None

# Per (device, dtype): whether the kernel ran (True) or raised the first time (False: scatters from then on)
_RAN: dict[tuple, bool] = {}
# Off CUDA: the dtypes run in Triton's interpreter (`TRITON_INTERPRET=1`, the CPU tests), else none
_INTERPRETED = (torch.float32, torch.float16) if os.environ.get("TRITON_INTERPRET") == "1" else ()


def available(key: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernel writes one token per row of `key` (`[B, Hk, 1, d]`, each head's elements
    contiguous) into `cache` (`[B, capacity, Hk, d]`, contiguous, the same dtype): Triton on CUDA
    (or float32/float16 in its interpreter, whose bfloat16 is not exact), a head size that is a
    power of two, and not known to fail on such tensors."""
    d = key.shape[-1]
    return (
        triton is not None
        and key.dtype in ((torch.float16, torch.bfloat16, torch.float32) if key.is_cuda else _INTERPRETED)
        and key.dim() == 4
        and key.stride(-1) == 1
        and key.shape[2] == 1
        and key.dtype == cache.dtype
        and cache.is_contiguous()
        and d & (d - 1) == 0
        and _RAN.get((str(key.device), key.dtype)) is not False
    )


def _launch(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, at: torch.Tensor) -> bool:
    B, capacity, Hk, d = keys.shape
    _kernel[(B, Hk)](
        keys, values, key, value, at, capacity,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), HK=Hk, D=d,
    )  # fmt: skip
    return True


def write(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, at: torch.Tensor) -> bool:
    """`keys[b, at[b]] = key[b, :, 0]` and the same for values, for every row b (`at` `[B]` int64;
    a row whose slot is past the capacity writes nothing, where a scatter would fault); False
    (nothing written) where Triton could not run it the first time on such tensors: the caller
    writes them itself."""
    if triton is None:
        raise ModAdaptError("the K/V write kernel needs Triton")
    if value.shape != key.shape or values.shape != keys.shape:
        raise ModAdaptError(f"the K/V write kernel takes a value like its key, got {value.shape} for {key.shape}")
    if value.stride(-1) != 1:
        return False
    call = lambda: _launch(keys, values, key, value, at)  # noqa: E731
    return tried(_RAN, (str(key.device), key.dtype), (Exception,), call) is not None


if triton is not None:

    @triton.jit
    def _kernel(KEYS, VALUES, KEY, VALUE, AT, capacity, skb, skh, svb, svh, HK: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        dd = tl.arange(0, D)
        at = tl.load(AT + b)
        inside = (dd < D) & (at < capacity)  # the row's slot past the buffer: not written, over the whole head
        slot = (b * capacity + at).to(tl.int64) * HK + h
        tl.store(KEYS + slot * D + dd, tl.load(KEY + b * skb + h * skh + dd), mask=inside)
        tl.store(VALUES + slot * D + dd, tl.load(VALUE + b * svb + h * svh + dd), mask=inside)
