"""Launching direct-PTX kernels (codegen/ptx.py) on a GPU through the CUDA driver API (cuda-python).

Where it sits: the `cuda` backend's launcher for kernels whose report says `backend: "ptx"`; the
launch plan (runtime/launch.py) calls `load_ptx_kernel(compiled_ptx)` and then `fn[grid](*args)`,
exactly like a Triton kernel: the PTX kernel takes its Triton twin's arguments (tensor pointers,
then i32/i64 scalars, `spec.args`) and runs on the same grid with 32 * num_warps threads per block.

    cuModuleLoadData(cubin) -> cuModuleGetFunction(name) -> cuLaunchKernel(grid, block, smem 0,
    torch's current stream, kernelParams)

`cuda-python` is an optional dependency (`pip install dsr_compiler[gpu]`; `from cuda.bindings import
driver`, or `from cuda import cuda` for releases before 12.6). Nothing here runs without a GPU; the
tests under tests/gpu exercise it. Errors become RuntimeLaunchError with the driver's error name.
The module and function handles are cached per cubin (sha256) and device; a module is never
unloaded while the process runs (kernels are few and small).
"""
from __future__ import annotations

import ctypes
import hashlib
import threading
from typing import Any, Sequence

import torch
from dsr_compiler.ir.errors import RuntimeLaunchError

_LOCK = threading.Lock()
_FUNCS: dict[tuple[str, int, str], Any] = {}
_DRIVER: Any = None


def driver() -> Any:
    """The cuda-python driver bindings (new layout first, then the pre-12.6 one)."""
    global _DRIVER
    if _DRIVER is None:
        try:
            from cuda.bindings import driver as drv  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cuda as drv  # type: ignore[no-redef]  # older cuda-python
            except ImportError:
                raise RuntimeLaunchError("the cuda backend needs cuda-python to launch direct-PTX kernels",
                                         hint="pip install 'cuda-python>=12.4' (the `gpu` extra), or compile "
                                              "without PTX kernels (unset DSR_PTX / ptx_families=())") from None
        try:
            result = drv.cuInit(0)
        except Exception as e:  # noqa: BLE001 - cuda-python >= 13 raises when libcuda is missing
            raise RuntimeLaunchError(f"CUDA driver: cuInit failed: {e}",
                                     hint="the cuda backend needs an NVIDIA driver; use --backend interpret") from None
        _check(drv, result, "cuInit")
        _DRIVER = drv
    return _DRIVER


def _check(drv: Any, result: Any, what: str) -> Any:
    """cuda-python returns (CUresult, *values); raise on an error, return the values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if int(err) != int(drv.CUresult.CUDA_SUCCESS):
        name = "?"
        try:
            e2, s = drv.cuGetErrorName(err)
            name = s.decode() if isinstance(s, bytes) else str(s)
        except Exception:  # noqa: BLE001 - the name is only for the message
            pass
        raise RuntimeLaunchError(f"CUDA driver: {what} failed: {name} ({int(err)})",
                                 hint="DSR_DEBUG=7 prints the PTX; compare with the Triton twin (unset DSR_PTX)")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _ensure_context(drv: Any, device: int) -> None:
    """Make the device's primary context current on this thread (torch uses the same one)."""
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device)          # forces torch's lazy CUDA init
    ctx = _check(drv, drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx) == 0:
        dev = _check(drv, drv.cuDeviceGet(device), "cuDeviceGet")
        pctx = _check(drv, drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check(drv, drv.cuCtxSetCurrent(pctx), "cuCtxSetCurrent")


def _function(cubin: bytes, name: str, device: int) -> Any:
    key = (hashlib.sha256(cubin).hexdigest(), device, name)
    with _LOCK:
        fn = _FUNCS.get(key)
        if fn is None:
            drv = driver()
            _ensure_context(drv, device)
            module = _check(drv, drv.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
            fn = _check(drv, drv.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
            _FUNCS[key] = fn
    return fn


class PtxLaunch:
    """`k[grid](*args)` for a direct-PTX kernel; args follow spec.args (tensors, then int scalars)."""

    def __init__(self, compiled: Any, spec: Any) -> None:
        self.compiled = compiled              # codegen.ptx.CompiledPtx
        self.spec = spec
        self.name = spec.name
        self.threads = compiled.threads
        self.scalar_types = [ctypes.c_int64 if a.scalar_dtype == "i64" else ctypes.c_int32
                             for a in spec.args if a.kind == "scalar"]

    def __getitem__(self, grid: Sequence[int]):
        def launch(*args: Any, **_ignored: Any) -> None:
            self.launch(tuple(grid), args)
        return launch

    def launch(self, grid: tuple[int, ...], args: Sequence[Any]) -> None:
        if len(args) != len(self.spec.args):
            raise RuntimeLaunchError(f"{self.name}: {len(args)} arguments for {len(self.spec.args)} parameters")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise RuntimeLaunchError(f"{self.name}: a PTX kernel needs at least one tensor argument")
        dev = tensors[0].device
        if dev.type != "cuda" or any(t.device != dev for t in tensors):
            raise RuntimeLaunchError(f"{self.name}: PTX kernels take CUDA tensors on one device, got "
                                     f"{sorted({str(t.device) for t in tensors})}")
        drv = driver()
        fn = _function(self.compiled.cubin, self.name, dev.index or 0)
        values: list[Any] = []
        types: list[Any] = []
        scalars = iter(self.scalar_types)
        for spec_arg, a in zip(self.spec.args, args):
            if spec_arg.kind == "tensor":
                if not isinstance(a, torch.Tensor):
                    raise RuntimeLaunchError(f"{self.name}: argument {spec_arg.name} must be a tensor")
                values.append(a.data_ptr())
                types.append(ctypes.c_void_p)
            else:
                values.append(int(a))
                types.append(next(scalars))
        g = tuple(grid) + (1,) * (3 - len(grid))
        stream = drv.CUstream(torch.cuda.current_stream(dev).cuda_stream)
        _check(drv, drv.cuLaunchKernel(fn, g[0], g[1], g[2], self.threads, 1, 1, 0, stream,
                                       (tuple(values), tuple(types)), 0), f"cuLaunchKernel({self.name})")

    def __repr__(self) -> str:
        return f"PtxLaunch({self.name}, {self.threads} threads)"


def load_ptx_kernel(compiled: Any, spec: Any) -> PtxLaunch:
    return PtxLaunch(compiled, spec)


__all__ = ["PtxLaunch", "driver", "load_ptx_kernel"]
