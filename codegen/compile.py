"""Compiling rendered Triton source: PTX + cubin for sm_90a (no GPU needed), or loading it.

Sits after rendering. `compile_triton` writes the source to a real file (Triton's jit
reads source through `inspect`), imports it under a unique module name with
TRITON_INTERPRET unset, compiles it for an explicit `GPUTarget("cuda", 90, 32)` through
the stable `triton.compile(ASTSource(...))` entry point, and runs ptxas -v on the PTX to
record registers, spills, shared memory and stack. The Triton compile itself runs in a reused
worker process (`compile_worker.py`) under a deadline (DSR_COMPILE_TIMEOUT, default 600 s): a
compile stuck in LLVM, or Ctrl-C during one, ends the worker instead of hanging this process.
`load_interpreted` builds the same source under TRITON_INTERPRET=1 (CPU tensors); `load_jit` for a
real GPU.

The compile assumes every pointer argument is 16-byte aligned (see `specialization_attrs`);
a launcher must pass aligned buffers (torch allocations are). Results are plain data
(`CompiledKernel`, frozen); the artifact cache (runtime/cache.py, through codegen/build.py) stores
them as plain files keyed on spec.hash() + codegen_fingerprint() + versions.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import importlib.util
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsr_compiler.ir import knobs
from dsr_compiler.ir.errors import CodegenError, DsrError

from .spec import KernelSpec

_LOCK = threading.Lock()


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    cubin: bytes = field(repr=False)
    ttir: str = field(repr=False, default="")
    ttgir: str = field(repr=False, default="")
    llir: str = field(repr=False, default="")
    target: str = "sm_90a"
    registers: int = 0
    spill_stores: int = 0          # bytes
    spill_loads: int = 0           # bytes
    shared_mem: int = 0            # bytes: Triton's dynamic shared memory + ptxas static smem
    stack: int = 0                 # bytes of local stack frame
    num_warps: int = 4             # a launch uses 32 * num_warps threads per block
    num_stages: int = 3
    dynamic_shared: int = 0        # bytes to pass as the launch's dynamic shared memory (> 48 KiB needs
                                   # cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) first)
    ptx_params: int = 0            # .param count of the entry: the spec's args, then the pointers Triton
                                   # appends (global scratch, profile scratch; pass NULL when sizes are 0)
    global_scratch_size: int = 0
    profile_scratch_size: int = 0
    compile_s: float = 0.0
    ptxas_log: str = ""
    spec_hash: str = ""
    triton_version: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def meta(self) -> dict[str, Any]:
        """Everything but the big artifacts, as JSON-able plain data."""
        d = asdict(self)
        for k in ("ptx", "cubin", "ttir", "ttgir", "llir"):
            d.pop(k)
        return d


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- loading source

def _source_dir() -> Path:
    d = Path(knobs.get("DSR_CACHE_DIR")) / "triton_src"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d
    except OSError:
        pass
    # the cache folder is unusable (a file, read-only): a private folder of this process, never a shared
    # fixed-name one in /tmp, because the source written here is imported
    global _PRIVATE_SRC
    if _PRIVATE_SRC is None:
        _PRIVATE_SRC = Path(tempfile.mkdtemp(prefix="dsr_triton_src_"))
        atexit.register(shutil.rmtree, _PRIVATE_SRC, True)
    return _PRIVATE_SRC


_PRIVATE_SRC: Path | None = None


def _preload_triton() -> None:
    """Import the Triton modules that are otherwise imported lazily during the first launch.

    Triton imports `triton.experimental.gluon` on first use of its argument specializer; done
    in the middle of an interpreted launch (while the interpreter patches `tl`), with
    TRITON_INTERPRET already restored, that import asserts. Importing it up front avoids it.
    """
    with knobs.triton_interpret(False):
        import triton  # noqa: F401
        with contextlib.suppress(Exception):
            importlib.import_module("triton.experimental.gluon")


def _source_file(spec: KernelSpec, source: str, mode: str) -> tuple[Path, str]:
    """(the generated source's file, written if needed; its module name for `mode`)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = _source_dir() / f"{spec.name}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        _atomic_write(path, source.encode())
    return path, f"dsr_kernel_{spec.name}_{digest}_{mode}"


def _import(spec: KernelSpec, source: str, interpret: bool) -> Any:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    mode = "interp" if interpret else "jit"
    modname = f"dsr_kernel_{spec.name}_{digest}_{mode}"
    _preload_triton()
    with _LOCK:
        mod = sys.modules.get(modname)
        if mod is None:
            path, _ = _source_file(spec, source, mode)
            module_spec = importlib.util.spec_from_file_location(modname, path)
            if module_spec is None or module_spec.loader is None:
                raise CodegenError(f"codegen: cannot import generated source {path}")
            mod = importlib.util.module_from_spec(module_spec)
            with knobs.triton_interpret(interpret):
                try:
                    module_spec.loader.exec_module(mod)
                except Exception as e:  # a template bug: show it with the kernel's name
                    raise CodegenError(f"codegen: generated source for {spec.name} failed to import: {e}",
                                       where=str(path)) from e
            sys.modules[modname] = mod
    fn = getattr(mod, spec.name, None)
    if fn is None:
        raise CodegenError(f"codegen: generated module has no kernel {spec.name}")
    return fn


class InterpretedKernel:
    """A kernel built under TRITON_INTERPRET=1; `k[grid](*args)` runs it on CPU tensors.

    Launches also run with TRITON_INTERPRET=1 set (and restored after): Triton reads the knob
    lazily during a launch too. Keyword options such as num_warps are accepted and ignored.
    """

    def __init__(self, fn: Any, name: str) -> None:
        self.fn = fn
        self.name = name

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("num_warps", None)
            kwargs.pop("num_stages", None)
            with knobs.triton_interpret(True):
                return self.fn[grid](*args, **kwargs)
        return launch

    def __repr__(self) -> str:
        return f"InterpretedKernel({self.name})"


def load_interpreted(spec: KernelSpec, source: str) -> InterpretedKernel:
    """The kernel built under TRITON_INTERPRET=1: call `fn[grid](*args)` with CPU tensors."""
    return InterpretedKernel(_import(spec, source, interpret=True), spec.name)


def load_jit(spec: KernelSpec, source: str) -> Any:
    """The kernel as a Triton JITFunction for a real GPU: `fn[grid](*args, num_warps=..., num_stages=...)`."""
    return _import(spec, source, interpret=False)


# ----------------------------------------------------------------------------- compiling

def parse_target(target: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", target)
    if not m:
        raise CodegenError(f"codegen: unknown target {target!r}", hint="use sm_90a")
    return int(m.group(1))


def ptxas_path(arch: int = 90) -> str:
    """The ptxas that Triton itself uses for `arch` (its PTX .version matches it).

    Order: Triton's own choice (`get_ptxas`, which honours TRITON_PTXAS_PATH /
    TRITON_PTXAS_BLACKWELL_PATH; triton 3.9 uses the bundled `ptxas-blackwell` for sm_90+),
    then the bundled binaries, then `ptxas` on PATH.
    """
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # older/newer Triton without this helper: fall through
        pass
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    names = ["ptxas-blackwell", "ptxas"] if arch >= 90 else ["ptxas"]
    for n in names:
        c = bin_dir / n
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("ptxas")
    if found:
        return found
    raise CodegenError("codegen: ptxas not found", hint="install triton (it bundles ptxas) or the CUDA toolkit")


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    out = {}
    for k, pat in _PTXAS_PATTERNS.items():
        vals = [int(x) for x in pat.findall(log)]
        out[k] = max(vals) if vals else 0
    return out


def run_ptxas(ptx: str, arch: int, name: str = "kernel", exe: str | None = None) -> tuple[bytes, str, dict[str, int]]:
    """Assemble PTX with `ptxas -arch=sm_XXa -v` (codegen's one ptxas wrapper; `exe` defaults to
    `ptxas_path(arch)`); returns (cubin, log, parsed stats)."""
    exe = exe or ptxas_path(arch)
    with tempfile.TemporaryDirectory(prefix="dsr_ptxas_") as d:
        src, out = Path(d) / f"{name}.ptx", Path(d) / f"{name}.cubin"
        src.write_text(ptx)
        cmd = [exe, f"-arch=sm_{arch}a", "-v", str(src), "-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        log = (p.stdout + p.stderr).replace(d + os.sep, "")
        if p.returncode != 0:
            raise CodegenError(f"codegen: ptxas failed for {name} (exit {p.returncode})", where=log.strip(),
                               hint="the generated PTX is invalid for this ptxas/arch")
        return out.read_bytes(), log, parse_ptxas_log(log)


def specialization_attrs(spec: KernelSpec) -> dict[tuple[int, ...], list[list[Any]]]:
    """What the compile may assume about the arguments (as Triton's JIT would at launch):
    every pointer is 16-byte aligned, and so is every int scalar whose size expression is a
    multiple of 16 for all symbol values. This is what lets loads vectorize and pipeline."""
    from dsr_compiler.ir.types import parse_dim
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, a in enumerate(spec.args):
        if a.kind == "tensor" or (parse_dim(a.expr) / 16).is_integer is True:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_triton(spec: KernelSpec, source: str, target: str = "sm_90a") -> CompiledKernel:
    """Compile rendered source for `target` without a GPU: ttir/ttgir/llir/PTX/cubin + ptxas stats.

    The Triton compile runs in the compile worker (a reused process, `compile_worker.py`) and one
    past DSR_COMPILE_TIMEOUT seconds (default 600) is a CodegenError; DSR_COMPILE_TIMEOUT=0 compiles
    in this process, without a limit."""
    import triton
    arch = parse_target(target)
    t0 = time.perf_counter()
    knobs.triton_defaults()
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    timeout = compile_timeout()
    try:
        if timeout:
            asm, meta = _compile_in_worker(spec, source, arch, options, timeout)
        else:
            asm, meta = _compile_here(spec, source, arch, options)
    except CodegenError:
        raise
    except Exception as e:
        raise _triton_failed(spec, str(e) or type(e).__name__) from e
    ptx = asm["ptx"]
    _, log, stats = run_ptxas(ptx, arch, spec.name)
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    n_params = len(re.findall(r"\.param\b", entry.group(1))) if entry else 0
    dyn_shared = meta["shared"]
    return CompiledKernel(
        name=spec.name, ptx=ptx, cubin=asm["cubin"], ttir=asm.get("ttir", ""), ttgir=asm.get("ttgir", ""),
        llir=asm.get("llir", ""), target=target, registers=stats["registers"], spill_stores=stats["spill_stores"],
        spill_loads=stats["spill_loads"], shared_mem=dyn_shared + stats["smem"], stack=stats["stack"],
        num_warps=spec.num_warps, num_stages=spec.num_stages, dynamic_shared=dyn_shared, ptx_params=n_params,
        global_scratch_size=meta["global_scratch_size"], profile_scratch_size=meta["profile_scratch_size"],
        compile_s=round(time.perf_counter() - t0, 3), ptxas_log=log.strip(), spec_hash=spec.hash(),
        triton_version=triton.__version__)


COMPILE_TIMEOUT_S = knobs.KNOBS["DSR_COMPILE_TIMEOUT"].default


def compile_timeout() -> int:
    """The DSR_COMPILE_TIMEOUT knob in seconds (0: compile in this process; default COMPILE_TIMEOUT_S)."""
    try:
        return int(knobs.get("DSR_COMPILE_TIMEOUT"))
    except DsrError as e:               # reported as a codegen failure, where the compile reads it
        raise CodegenError(e.what, hint=e.hint) from None


def _triton_failed(spec: KernelSpec, text: str) -> CodegenError:
    msg = text.strip().splitlines()
    return CodegenError(f"codegen: Triton failed to compile {spec.name}: {msg[-1] if msg else 'unknown error'}",
                        where="\n".join(msg[:40]), hint="see the generated source (DSR_DEBUG=4)")


_META = ("shared", "global_scratch_size", "profile_scratch_size")


def _compile_here(spec: KernelSpec, source: str, arch: int, options: dict) -> tuple[dict[str, Any], dict[str, int]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = load_jit(spec, source)
    src = ASTSource(fn=fn, signature=spec.signature(), constexprs={}, attrs=specialization_attrs(spec))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return dict(k.asm), {m: int(getattr(k.metadata, m, 0) or 0) for m in _META}


# ----------------------------------------------------------------------------- the compile worker

_WORKER: list[subprocess.Popen] = []      # every live worker (the build compiles on several at once)
_IDLE: list[subprocess.Popen] = []        # the warm ones not compiling now, reused across kernels


def compile_jobs() -> int:
    """How many kernels the build compiles at once (DSR_COMPILE_JOBS; 0: this machine's CPUs, at most 8)."""
    try:
        jobs = int(knobs.get("DSR_COMPILE_JOBS"))
    except DsrError as e:
        raise CodegenError(e.what, hint=e.hint) from None
    if jobs == 0:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        jobs = min(cpus, 8)
    return max(1, jobs)


def _take_worker() -> subprocess.Popen:
    with _LOCK:
        while _IDLE:
            proc = _IDLE.pop()
            if proc.poll() is None:
                return proc
            _forget(proc)
        script = Path(__file__).with_name("compile_worker.py")
        proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                bufsize=0)
        _WORKER.append(proc)
        return proc


def _give_back(proc: subprocess.Popen) -> None:
    with _LOCK:
        if proc.poll() is None and proc in _WORKER:
            _IDLE.append(proc)


def _forget(proc: subprocess.Popen) -> None:
    if proc in _WORKER:
        _WORKER.remove(proc)
    if proc in _IDLE:
        _IDLE.remove(proc)


def _kill(proc: subprocess.Popen) -> None:
    """End one worker (a stuck compile, or an error mid-exchange): it holds no state worth waiting for."""
    with _LOCK:
        _forget(proc)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def stop_workers() -> None:
    """End every worker (Ctrl-C or exit); a compile waiting on one then sees it end."""
    while True:
        with _LOCK:
            if not _WORKER:
                return
            proc = _WORKER[-1]
        _kill(proc)


atexit.register(stop_workers)


def _compile_in_worker(spec: KernelSpec, source: str, arch: int, options: dict,
                       timeout: float) -> tuple[dict[str, Any], dict[str, int]]:
    from . import compile_worker as cw
    path, modname = _source_file(spec, source, "worker")
    attrs = [[list(k), v] for k, v in specialization_attrs(spec).items()]
    req = {"env": knobs.environ(), "path": str(path), "module": modname, "kernel": spec.name,
           "signature": spec.signature(), "attrs": attrs, "options": options, "arch": arch}
    proc = _take_worker()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        cw.send(proc.stdin.fileno(), req)
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            _kill(proc)
            raise CodegenError(f"codegen: compiling {spec.name} took longer than {timeout:g} s "
                               "(DSR_COMPILE_TIMEOUT); the compile worker was stopped",
                               where=f"kernel {spec.name} ({spec.family}, template {spec.template})",
                               hint="a kernel this slow to compile is a codegen bug worth reporting (DSR_DEBUG=4 "
                                    "shows its source); raise DSR_COMPILE_TIMEOUT to wait longer")
        reply = cw.recv(proc.stdout.fileno())
    except BaseException:          # Ctrl-C, a timeout or a broken pipe: the worker may be mid-compile
        _kill(proc)
        raise
    if reply is None:
        _kill(proc)
        raise CodegenError(f"codegen: the compile worker ended while compiling {spec.name} (exit {proc.poll()})",
                           hint="rerun with DSR_COMPILE_TIMEOUT=0 to compile in this process and see the error")
    _give_back(proc)
    if not reply["ok"]:
        raise _triton_failed(spec, reply["error"])
    asm = dict(reply["asm"])
    asm["cubin"] = base64.b64decode(asm["cubin"])
    return asm, reply["meta"]


__all__ = ["CompiledKernel", "InterpretedKernel", "compile_jobs", "compile_timeout", "compile_triton", "load_interpreted",
           "load_jit", "parse_ptxas_log", "parse_target", "ptxas_path", "run_ptxas", "specialization_attrs",
           "stop_workers"]
