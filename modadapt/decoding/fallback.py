"""Try a kernel once per kind of tensor, then fall back for good: the decode kernels' shared rule.

A Triton or flash kernel may fail to compile or launch on some GPU, dtype or head size. The first
such failure sends tensors of that kind to the next path (cuBLAS, the scatters, flash, the masked
attention) from then on; once a kernel has run on such tensors, a failure is a real error and
raises (a silent fallback there would hide a bug, or a fault of the device).
"""

from __future__ import annotations


def tried(ran: dict, key: tuple, errors: tuple, call):
    """`call()`, or None where it raised one of `errors` on tensors of `key` it never ran on
    (recorded in `ran`: such tensors take the next path from then on). Once it has run on such
    tensors, a failure raises."""
    try:
        out = call()
    except errors:
        if ran.get(key):
            raise
        ran[key] = False
        return None
    ran[key] = True
    return out
