"""Building kernels: a fused graph -> KernelSpec -> rendered source -> compiled artifacts.

Sits at the end of codegen, called by the front door (`dsr.compile`). Every kernel is lowered,
rendered, compiled by Triton for the target (through the content-addressed artifact cache the caller
hands in: runtime/cache.py's `ArtifactCache`), and, for families the options emit as direct PTX,
also rendered as PTX and assembled (codegen/ptx.py). The result is one frozen `KernelArtifact` per
kernel: what the runtime launches (runtime/launch.py) and what the report and the dump read.
A cache entry is keyed on spec hash + codegen fingerprint + source hash + versions + target.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from dsr_compiler.ir.graph import Graph

from .compile import CompiledKernel, compile_jobs, compile_timeout, compile_triton, stop_workers
from .lower import lower_kernel
from .ptx import CompiledPtx, PtxUnsupported, compile_ptx_kernel
from .render import codegen_fingerprint, render
from .spec import KernelSpec


class ArtifactStore(Protocol):
    """What the build needs of an artifact cache (runtime/cache.py `ArtifactCache` is one)."""

    def key(self, content: str, target: str) -> str: ...
    def get(self, key: str, required: Iterable[str] = ()) -> dict[str, bytes] | None: ...
    def put(self, key: str, files: Mapping[str, bytes]) -> None: ...
    def evict(self, key: str) -> None: ...


@dataclass(frozen=True)
class KernelArtifact:
    """One built kernel: its spec, Triton source and compiled forms."""

    spec: KernelSpec
    source: str                        # rendered Triton source
    compiled: CompiledKernel | None    # PTX, cubin, registers, spills, ... (None: not compiled, e.g. tests)
    compile_ms: float
    cached: bool                       # the compiled form came from the artifact cache
    ptx: CompiledPtx | None = None     # when the kernel runs as direct PTX (backend "ptx")
    ptx_note: str = ""                 # why a kernel of a PTX-selected family stayed on Triton

    @property
    def backend(self) -> str:
        return "ptx" if self.ptx is not None else "triton"


def build_kernels(g: Graph, target: str = "sm_90a", ptx_families: Sequence[str] = (),
                  cache: ArtifactStore | None = None,
                  on_kernel: Callable[[int, int, str], None] | None = None) -> list[KernelArtifact]:
    """Lower, render and compile (through `cache`, if any) every kernel of a fused graph; kernels of
    `ptx_families` are also emitted as direct PTX (codegen/ptx.py) next to their Triton twin.

    Lowering and rendering run here in order; the Triton compiles run `compile_jobs()` at a time,
    each in its own worker process (DSR_COMPILE_JOBS; one at a time when DSR_COMPILE_TIMEOUT=0
    compiles in this process). The result is in kernel order whatever order the compiles finish in,
    and the first failing kernel (in kernel order) is the error. `on_kernel(i, n, name)` is called
    as each kernel is done (progress lines)."""
    n = len(g.kernels)
    rendered = []
    for i, k in enumerate(g.kernels, start=1):
        spec = lower_kernel(k, i)
        rendered.append((spec, render(spec)))
    jobs = 1 if compile_timeout() == 0 else min(compile_jobs(), n)

    def build_one(spec: KernelSpec, source: str) -> KernelArtifact:
        t = time.perf_counter()
        compiled, cached = compile_cached(spec, source, target, cache)
        ptx, note = None, ""
        if spec.family in ptx_families:
            try:
                ptx = compile_ptx_kernel(spec, target)
            except PtxUnsupported as e:
                note = e.what
        return KernelArtifact(spec, source, compiled, (time.perf_counter() - t) * 1e3, cached, ptx, note)

    if jobs <= 1:
        out = []
        for i, (spec, source) in enumerate(rendered, start=1):
            if on_kernel is not None:
                on_kernel(i, n, spec.name)
            out.append(build_one(spec, source))
        return out
    return _build_parallel(rendered, build_one, jobs, on_kernel)


def _build_parallel(rendered: list[tuple[KernelSpec, str]], build_one: Callable[[KernelSpec, str], KernelArtifact],
                    jobs: int, on_kernel: Callable[[int, int, str], None] | None) -> list[KernelArtifact]:
    """`build_one` over the kernels on `jobs` threads (each drives one compile worker process)."""
    n = len(rendered)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="dsr-compile")
    futures: list[Future] = []
    ok = False
    try:
        futures = [pool.submit(build_one, spec, source) for spec, source in rendered]
        index = {f: i for i, f in enumerate(futures)}
        failed = None
        for done, f in enumerate(as_completed(futures), start=1):
            if on_kernel is not None:
                on_kernel(done, n, rendered[index[f]][0].name)
            if f.exception() is not None:
                failed = index[f]
                break
        if failed is not None:              # the first failure in kernel order is the error
            for f in futures[:failed]:
                if f.exception() is not None:
                    raise f.exception()
            raise futures[failed].exception()
        out = [f.result() for f in futures]
        ok = True
        return out
    finally:
        if not ok:                          # an error or Ctrl-C: drop queued compiles, end running ones
            for f in futures:
                f.cancel()
            stop_workers()
        pool.shutdown(wait=True, cancel_futures=True)
        if not ok:
            stop_workers()                  # one started by a compile that was taking its worker just then


CACHE_FILES = ("meta.json", "kernel.ptx", "kernel.cubin", "kernel.ttir", "kernel.ttgir", "kernel.llir")


def compile_cached(spec: KernelSpec, source: str, target: str,
                   cache: ArtifactStore | None) -> tuple[CompiledKernel, bool]:
    """compile_triton through the content-addressed artifact cache: (CompiledKernel, was it a hit).
    An entry missing any of CACHE_FILES, or whose meta.json does not load, is evicted and rewritten."""
    if cache is None:
        return compile_triton(spec, source, target), False
    key = cache.key(spec.hash() + codegen_fingerprint() + hashlib.sha256(source.encode()).hexdigest(), target)
    files = cache.get(key, required=CACHE_FILES)
    if files is not None:
        try:
            meta = _cached_meta(files["meta.json"])
            return CompiledKernel(ptx=files["kernel.ptx"].decode(), cubin=files["kernel.cubin"],
                                  ttir=files["kernel.ttir"].decode(), ttgir=files["kernel.ttgir"].decode(),
                                  llir=files["kernel.llir"].decode(), **meta), True
        except (ValueError, TypeError, RecursionError):   # bad JSON / UTF-8 / fields: not a usable entry
            cache.evict(key)
    ck = compile_triton(spec, source, target)
    cache.put(key, {"meta.json": json.dumps(ck.meta(), sort_keys=True).encode(), "kernel.ptx": ck.ptx.encode(),
                    "kernel.cubin": ck.cubin, "kernel.ttir": ck.ttir.encode(), "kernel.ttgir": ck.ttgir.encode(),
                    "kernel.llir": ck.llir.encode()})
    return ck, False


def _cached_meta(raw: bytes) -> dict[str, Any]:
    """meta.json of a cache entry (bytes from disk: untrusted): an object of CompiledKernel's scalar
    fields whose values have the field's type; TypeError otherwise."""
    meta = json.loads(raw)
    types = {f.name: f.type for f in dataclasses.fields(CompiledKernel)}    # annotations are strings (__future__)
    if not isinstance(meta, dict):
        raise TypeError("meta.json is not an object")
    for k, v in meta.items():
        want = {"int": int, "str": str, "float": (int, float)}.get(types.get(k, ""))
        if want is None or not isinstance(v, want) or isinstance(v, bool):
            raise TypeError(f"meta.json field {k!r} is unknown or has the wrong type")
    return meta


__all__ = ["CACHE_FILES", "ArtifactStore", "KernelArtifact", "build_kernels", "compile_cached"]
