"""CUDA graph conditional nodes through the CUDA driver, for torch builds that lack them.

`branches="conditional"` takes a MoD layer's work or skips it on the GPU, without a round trip
to the host. torch captures such a branch itself where `CUDAGraph.begin_capture_to_if_node`
exists; torch 2.11 (the GPU machine's) has no such method, but its driver has conditional nodes
(CUDA 12.4+). There the step is captured in pieces, as for `"host"`, each piece a torch graph
(`keep_graph=True`, so its `cudaGraph_t` stays), and `ConditionalGraph` stitches them into one
driver graph: each piece as a child-graph node, each MoD layer's work inside an IF node whose
condition a one-thread kernel (compiled once with NVRTC, the runtime compiler torch ships) sets
from the routing piece's decision bytes (any of them: at batch, the layer runs if some row keeps).
One launch of the stitched graph runs the whole step.

Only `ctypes` and the libraries torch itself loads (the driver, NVRTC): no new dependency.
The pieces' memory is the torch graphs' pool, so the torch graphs must outlive the stitched one
(`DecodeStep` holds both).
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Any

import torch

from ..errors import ModAdaptError

_SOURCE = r"""
extern "C" __device__ void cudaGraphSetConditional(unsigned long long handle, unsigned int value);
extern "C" __global__ void modadapt_set_condition(unsigned long long handle, const unsigned char* flags, int count) {
    unsigned int any = 0u;
    for (int i = 0; i < count; ++i) any |= flags[i] != 0 ? 1u : 0u;
    cudaGraphSetConditional(handle, any);
}
"""
_KERNEL = b"modadapt_set_condition"
_NODE_CONDITIONAL = 13  # CU_GRAPH_NODE_TYPE_CONDITIONAL
_COND_IF = 0  # CU_GRAPH_COND_TYPE_IF
_ASSIGN_DEFAULT = 1  # CU_GRAPH_COND_ASSIGN_DEFAULT: every launch starts from the default (skip)


class _NodeParams(ctypes.Structure):
    """`CUgraphNodeParams` (256 bytes) holding `CUDA_CONDITIONAL_NODE_PARAMS` in its union."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("reserved0", ctypes.c_int * 3),
        ("handle", ctypes.c_uint64),
        ("cond_type", ctypes.c_int),
        ("size", ctypes.c_uint),
        ("graphs_out", ctypes.POINTER(ctypes.c_void_p)),
        ("ctx", ctypes.c_void_p),
        ("rest", ctypes.c_longlong * 25),  # the union's other 25 of its 29 long longs
        ("reserved2", ctypes.c_longlong),
    ]


_DRIVER: dict[str, Any] = {}


def available() -> bool:
    """Whether conditional nodes can be built through the driver here (a CUDA device, a driver
    of CUDA 12.4 or later, NVRTC compiling the condition kernel, torch keeping captured graphs)."""
    if not torch.cuda.is_available():
        return False
    try:
        _driver()
    except ModAdaptError:
        return False
    return True


def _driver() -> dict[str, Any]:
    """The driver library and its version, once per process (and the condition kernel of the
    current device: `_kernel`)."""
    if "error" in _DRIVER:
        raise ModAdaptError(_DRIVER["error"])
    if "lib" in _DRIVER:
        return _DRIVER
    try:
        if not _keeps_graph():
            raise ModAdaptError("this torch cannot keep a captured CUDA graph (CUDAGraph(keep_graph=True))")
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        _check(lib, lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        if version.value < 12040:
            raise ModAdaptError(f"the CUDA driver ({version.value}) predates conditional graph nodes (12.4)")
        for name in (
            "cuGraphConditionalHandleCreate",
            "cuGraphAddNode_v2",
            "cuGraphAddChildGraphNode",
            "cuGraphInstantiateWithFlags",
        ):
            if not hasattr(lib, name):
                raise ModAdaptError(f"the CUDA driver has no {name}")
        _DRIVER.update(lib=lib, version=version.value, kernels={})
        _kernel(torch.cuda.current_device())  # compiles and loads it once here: a failure says no
    except ModAdaptError as error:
        _DRIVER.clear()
        _DRIVER["error"] = str(error)
        raise
    except OSError as error:
        _DRIVER.clear()
        _DRIVER["error"] = f"the CUDA driver could not be loaded ({error})"
        raise ModAdaptError(_DRIVER["error"]) from error
    return _DRIVER


def _keeps_graph() -> bool:
    try:
        torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        return False
    return hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph")


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(text))
        name = text.value.decode() if text.value else f"error {result}"
        raise ModAdaptError(f"the CUDA driver refused {what}: {name}")


def _nvrtc() -> ctypes.CDLL:
    """NVRTC as torch finds it (its private helpers, by their names in torch 2.8-2.14), else
    the library in torch's NVIDIA wheels or on the loader's path."""
    helpers = getattr(torch.cuda, "_utils", None)
    for name in ("_get_gpu_rtc_library", "_get_nvrtc_library"):
        fn = getattr(helpers, name, None)
        if fn is not None:
            try:
                return fn()
            except Exception:  # noqa: BLE001 - fall through to searching for it
                pass
    site = os.path.dirname(os.path.dirname(torch.__file__))  # where torch's NVIDIA wheels unpack
    for path in sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    try:
        return ctypes.CDLL("libnvrtc.so")
    except OSError as error:
        raise ModAdaptError("NVRTC (libnvrtc) was not found: the condition kernel cannot be compiled") from error


def _kernel(device: int) -> ctypes.c_void_p:
    """The condition kernel loaded into `device`'s primary context (torch's), once per device."""
    kernels = _DRIVER["kernels"]
    if device not in kernels:
        with torch.cuda.device(device):
            torch.empty(1, device="cuda")  # torch makes its (primary) context current, if it had none yet
            kernels[device] = _load_kernel(_DRIVER["lib"], device)
    return kernels[device]


def _load_kernel(lib, device: int) -> ctypes.c_void_p:
    """Compile `_SOURCE` for `device` (relocatable: the driver resolves `cudaGraphSetConditional`
    when it loads the module) and return its function, loaded into the current context."""
    nvrtc = _nvrtc()
    major, minor = torch.cuda.get_device_capability(device)
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), _SOURCE.encode(), b"modadapt_condition.cu", 0, None, None):
        raise ModAdaptError("NVRTC could not create the condition kernel's program")
    errors = []
    try:
        for extra in ([b"-rdc=true"], []):
            options = [f"--gpu-architecture=sm_{major}{minor}".encode(), *extra]
            array = (ctypes.c_char_p * len(options))(*options)
            if nvrtc.nvrtcCompileProgram(prog, len(options), array) != 0:
                size = ctypes.c_size_t()
                nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value)
                nvrtc.nvrtcGetProgramLog(prog, log)
                errors.append(f"{extra}: {log.value.decode(errors='replace').strip()[:200]}")
                continue
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            cubin = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetCUBIN(prog, cubin)
            module, fn = ctypes.c_void_p(), ctypes.c_void_p()
            result = lib.cuModuleLoadData(ctypes.byref(module), cubin)
            if result != 0:
                errors.append(f"{extra}: cuModuleLoadData error {result}")
                continue
            _check(lib, lib.cuModuleGetFunction(ctypes.byref(fn), module, _KERNEL), "cuModuleGetFunction")
            return fn  # the module stays loaded for the process
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    raise ModAdaptError("the condition kernel did not compile or load: " + "; ".join(errors))


class ConditionalGraph:
    """A driver graph stitched from captured torch graphs, in order: `add(graph)` always runs,
    `add_if(handle, graph)` runs when the condition `handle` holds. `condition()` makes a handle
    (each launch starts at 0: skip); `set_condition(handle, flags)` queues, on the current stream
    (inside a torch capture: into that graph), the kernel that sets it from a device tensor of
    bytes (true if any is nonzero). `instantiate()` once, then `launch()` per step on the current
    stream."""

    def __init__(self):
        d = _driver()
        self._lib, self._kernel = d["lib"], _kernel(torch.cuda.current_device())
        self._graph = ctypes.c_void_p()
        self._call(self._lib.cuGraphCreate(ctypes.byref(self._graph), 0), "cuGraphCreate")
        self._ctx = ctypes.c_void_p()
        self._call(self._lib.cuCtxGetCurrent(ctypes.byref(self._ctx)), "cuCtxGetCurrent")
        self._last: ctypes.c_void_p | None = None
        self._exec: ctypes.c_void_p | None = None

    def _call(self, result: int, what: str) -> None:
        _check(self._lib, result, what)

    def condition(self) -> int:
        handle = ctypes.c_uint64()
        self._call(
            self._lib.cuGraphConditionalHandleCreate(ctypes.byref(handle), self._graph, self._ctx, 0, _ASSIGN_DEFAULT),
            "cuGraphConditionalHandleCreate",
        )
        return handle.value

    def set_condition(self, handle: int, flags: torch.Tensor) -> None:
        if flags.numel() < 1 or flags.element_size() != 1 or not flags.is_cuda or not flags.is_contiguous():
            raise ModAdaptError("a condition is set from bytes on the GPU (a contiguous bool or uint8 tensor)")
        h, ptr, n = ctypes.c_uint64(handle), ctypes.c_void_p(flags.data_ptr()), ctypes.c_int(flags.numel())
        args = (ctypes.c_void_p * 3)(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in (h, ptr, n)))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._call(self._lib.cuLaunchKernel(self._kernel, 1, 1, 1, 1, 1, 1, 0, stream, args, None), "cuLaunchKernel")

    def _deps(self):
        if self._last is None:
            return None, 0
        return ctypes.byref(self._last), 1

    def _child(self, parent: ctypes.c_void_p, deps, count: int, graph: torch.cuda.CUDAGraph) -> ctypes.c_void_p:
        node = ctypes.c_void_p()
        raw = ctypes.c_void_p(graph.raw_cuda_graph())
        self._call(
            self._lib.cuGraphAddChildGraphNode(ctypes.byref(node), parent, deps, ctypes.c_size_t(count), raw),
            "cuGraphAddChildGraphNode",
        )
        return node

    def add(self, graph: torch.cuda.CUDAGraph) -> None:
        deps, n = self._deps()
        self._last = self._child(self._graph, deps, n, graph)

    def add_if(self, handle: int, graph: torch.cuda.CUDAGraph) -> None:
        params = _NodeParams()
        params.type, params.handle, params.cond_type, params.size = _NODE_CONDITIONAL, handle, _COND_IF, 1
        params.ctx = self._ctx
        node = ctypes.c_void_p()
        deps, n = self._deps()
        result = self._lib.cuGraphAddNode_v2(
            ctypes.byref(node), self._graph, deps, None, ctypes.c_size_t(n), ctypes.byref(params)
        )  # no edge data
        self._call(result, "cuGraphAddNode_v2 (a conditional node)")
        # the driver points `graphs_out` at the node's own (empty) body graphs
        self._child(ctypes.c_void_p(params.graphs_out[0]), None, 0, graph)
        self._last = node

    def instantiate(self) -> None:
        if self._exec is not None:
            raise ModAdaptError("this conditional graph is instantiated already")
        self._exec = ctypes.c_void_p()
        self._call(
            self._lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), self._graph, ctypes.c_ulonglong(0)),
            "cuGraphInstantiateWithFlags",
        )

    def launch(self) -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._call(self._lib.cuGraphLaunch(self._exec, stream), "cuGraphLaunch")

    def __del__(self):
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._exec is not None:
            lib.cuGraphExecDestroy(self._exec)
        lib.cuGraphDestroy(self._graph)
