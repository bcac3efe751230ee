"""`GraphedDecoder(compile=True)`: the decode step's layer calls through `torch.compile`, inside its graphs.

A captured step replays every kernel its pieces launch. At batch 1 most of a ~1B model's step is
not the GEMVs but ~25-30 small elementwise and reduction kernels per layer (RMSNorm, rotary, the
residual adds, SiLU * mul) of 1-3 us each (issue 17). Compiled with inductor in its default mode
(the CUDA graphs are the step's own, not reduce-overhead's), each chain fuses into a few kernels,
and the capture records those.

What is compiled: each layer's own forward (norms, projections, rotary, MLP, residual adds; the
dense layers, MoD layers' work, speculation's draft and verification alike), the rotary embedding
and the final norm, and the static cache's write (`StaticCache.update` traced as index writes
into the step's buffers, graph inputs that inductor writes in place: computed in the kernel of
the key's rotary and the value's projection sum, with no launch of its own). What is not: the
attention that reads the cache (`static_cache_attention`: the split-KV kernel, flash with used
lengths or the masked fallback, and its bookkeeping) is `torch.compiler.disable`d, so a layer
compiles as graphs around it (a graph break) and it runs as it does uncompiled (its kernels'
try-once fallbacks would break the graph anyway). Inductor's combo kernels (`COMBO_KERNELS`)
launch a graph's independent small kernels as one (a layer's q rotary with its K/V writes). The few-row linear layers that
`decode_linear.FewRowsLinear` sends to its kernel are one opaque op each in the compiled graphs
(Dynamo traces the mode, which the decoder enters around its steps), which an inductor post-grad
pass rewrites while compiling (`fuse_linears`: the layers of one input in one launch, split sums
left to the graph's own fused kernels). A MoD
layer's routing (`step.route_decision`: score, causal rule, gate, used lengths) and the merge of
its output (`step.merge_kept`) are compiled too; the branch decisions' bytes, the gathered modes'
row ordering and the token pick stay eager (sampling keeps torch's random stream).

When: shapes are static (`dynamic=False`), so each layer compiles once per step shape (batch,
tokens per row; not the cache capacity, which only the eager attention sees), in the first run of
the step's warm-up. The second warm-up run, the capture and every later decode call run under
`torch.compiler.set_stance("fail_on_recompile")`: nothing compiles inside a capture, the captured
kernels are the compiled ones, and a call that would compile again is an error instead of a silent
recompile per step. Dynamo specializes on each layer's index (the cache write takes it), so every
layer is its own cache entry on the one forward they share; the warm-up lifts Dynamo's recompile
limit (8 per code object) for that, and makes hitting it an error rather than a silent eager
fallback. The wrappers of the layers' forward are shared by every decoder of the process, so a
second decoder of the same layer class and step shapes compiles nothing.

Rounding: inductor is told to round half-precision intermediates where eager does
(`emulate_precision_casts`), since MoD routing thresholds a score and a last-bit difference
would flip decisions. In float32 (and bf16 on CPU) the compiled step gives the uncompiled one's
tokens; on CUDA, Triton's reduction order may still differ in the last bit (up to kernel rounding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import ModAdaptError

#: The `torch.compile` backend (tests may swap in a counting or failing one).
BACKEND: Any = "inductor"
#: Inductor's combo kernels: a graph's independent small kernels launched as one (a layer's q
#: rotary and its traced K/V writes; a MoD layer's merge and length count). Measured on an H200
#: (benchmarks/profile_graphed.py --batch 1 --compile --combo-kernels on|off, 1.1B Llama): 190 kernels
#: per step against 223, a 1015 us span against 1060.
COMBO_KERNELS = True
#: Dynamo cache entries allowed per code object during a warm-up: layers times step shapes.
RECOMPILE_LIMIT = 4096
_OFF = "pass compile=False to decode without torch.compile"


def check_compile(compile: Any, device: torch.device) -> bool:
    """`compile` as a bool, after checking that torch.compile can run here."""
    if not isinstance(compile, bool):
        raise ModAdaptError(f"compile must be True or False, got {compile!r}")
    if not compile:
        return False
    dynamo = getattr(torch, "_dynamo", None)
    if not hasattr(torch, "compile") or not hasattr(torch, "compiler") or dynamo is None:
        raise ModAdaptError(f"this torch has no torch.compile; {_OFF}.")
    if not dynamo.is_dynamo_supported():
        raise ModAdaptError(f"torch.compile does not support this Python or platform; {_OFF}.")
    if device.type == "cuda" and BACKEND == "inductor":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ModAdaptError(f"torch.compile (inductor) on CUDA needs Triton, which is not installed; {_OFF}.")
    return True


#: (a layer class's forward or the routing function, backend) -> its torch.compile wrapper, shared by every decoder of
#: the process: Dynamo's guards tell models and shapes apart, so a second decoder of the same layer
#: class and step shapes compiles nothing (a benchmark builds one decoder per setting).
_SHARED: dict[tuple[Callable, Any], Callable] = {}


class StepCompiler:
    """Compiles a decode step's calls and runs its warm-up: `shared(fn)` wraps a function that
    takes its module as an argument (a layer class's forward, the routing; shared, see `_SHARED`),
    `part(fn)` one of the model's own parts (its rotary embedding
    and final norm: a wrapper per decoder, which holds no model past the decoder's life),
    `compiling()` is where compiles may happen (the first warm-up run), `compiled()` where they
    must not (the rest: capture, replays, eager decode calls)."""

    def shared(self, forward: Callable) -> Callable:
        key = (forward, BACKEND)
        if key not in _SHARED:
            _SHARED[key] = _wrap(forward)
        return _SHARED[key]

    def part(self, fn: Callable) -> Callable:
        return _wrap(fn)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """The first warm-up run: compiles happen here, each layer its own cache entry."""
        config = torch._dynamo.config
        limits = {}
        for names in (
            ("recompile_limit", "cache_size_limit"),
            ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
        ):
            name = next((n for n in names if hasattr(config, n)), None)
            if name is not None:
                limits[name] = max(getattr(config, name), RECOMPILE_LIMIT)
        flag = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(config, n)), None)
        if flag is not None:
            limits[flag] = True  # past the limit: an error, not a silent eager fallback
        try:
            with config.patch(**limits), _eager_rounding(), _fused_linears(), _combo_kernels():
                yield
        except (ModAdaptError, torch.OutOfMemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - Dynamo's, inductor's, a C++ compiler's, Triton's: one message
            raise ModAdaptError(
                f"torch.compile failed on the decode step, compiling it or in its first compiled run "
                f"({_describe(error)}); {_OFF}."
            ) from error

    @contextlib.contextmanager
    def compiled(self) -> Iterator[None]:
        """After the first warm-up run: what runs must be compiled already (a recompile raises)."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                yield
        except RuntimeError as error:
            if "fail_on_recompile" not in str(error):
                raise
            raise ModAdaptError(
                "the compiled decode step would compile again after its warm-up (Dynamo's guards failed: "
                f"{_first_line(error)}); a captured graph must replay the warm-up's kernels. Please report "
                f"it; {_OFF}."
            ) from error


def _eager_rounding() -> contextlib.AbstractContextManager[None]:
    """Inductor keeps a fused chain's half-precision intermediates in float32 unless told to round
    them where eager rounds (`emulate_precision_casts`); a MoD router compares its score with a
    cut-off, so a last-bit difference flips decisions and the tokens drift from the uncompiled
    step's. Rounded as eager rounds, they agree (bf16 on CPU: the same tokens)."""
    try:
        from torch._inductor import config
    except ImportError:  # no inductor: nothing to set
        return contextlib.nullcontext()
    if not hasattr(config, "emulate_precision_casts"):
        return contextlib.nullcontext()
    return config.patch(emulate_precision_casts=True)


def _combo_kernels() -> contextlib.AbstractContextManager[None]:
    """Inductor's combo kernels while compiling, where `COMBO_KERNELS` asks for them."""
    try:
        from torch._inductor import config
    except ImportError:
        return contextlib.nullcontext()
    if not COMBO_KERNELS or not hasattr(config, "combo_kernels"):
        return contextlib.nullcontext()
    return config.patch(combo_kernels=True)


def _fused_linears() -> contextlib.AbstractContextManager[None]:
    """Inductor's post-grad pass that fuses the step's few-row linear layers (`fuse_linears`: one
    launch per input, split sums into their consumers), after any pass already set."""
    try:
        from torch._inductor import config
    except ImportError:  # no inductor: nothing to fuse
        return contextlib.nullcontext()
    from .fuse_linears import FuseLinears

    if FuseLinears is None or not hasattr(config, "post_grad_custom_post_pass"):
        return contextlib.nullcontext()
    return config.patch(post_grad_custom_post_pass=FuseLinears(config.post_grad_custom_post_pass))


def _wrap(fn: Callable) -> Callable:
    try:
        return torch.compile(fn, backend=BACKEND, dynamic=False)
    except Exception as error:  # noqa: BLE001 - whatever keeps torch.compile from starting
        raise ModAdaptError(f"torch.compile could not wrap the decode step ({_describe(error)}); {_OFF}.") from error


def _describe(error: BaseException) -> str:
    """`Type: first line` of the error, or of the backend's own error that Dynamo wrapped."""
    inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed: what the backend raised
    if isinstance(inner, BaseException):
        return f"{type(error).__name__} from {type(inner).__name__}: {_first_line(inner)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no message"


class NoCompiler:
    """`compile=False`: calls run as they are, and the warm-up contexts do nothing."""

    def shared(self, forward: Callable) -> Callable:
        return forward

    def part(self, fn: Callable) -> Callable:
        return fn

    def compiling(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def compiled(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
