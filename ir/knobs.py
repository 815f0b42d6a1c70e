"""Typed, documented knobs: every `DSR_*` environment variable the compiler reads.

Installed as dsr_compiler.ir.knobs at the bottom of the layers, so that ir, codegen and runtime read
them too; re-exported as `dsr_compiler.knobs`. Every environment read and write of the project goes
through this module: the `DSR_*` knobs (`get`), the Triton settings the compiler fixes
(`triton_defaults`, `triton_interpret`) and the environment handed to the compile worker (`environ`).
Read them through `knobs.get(name)`; tests scope them with `knobs.scoped(DSR_DEBUG=3)`.
DSR_DEBUG levels: 1 summary, 2 timings, 3 fusion decisions, 4 generated source, 5 IR per pass,
6 rewrite matches, 7 PTX.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DsrError


@dataclass(frozen=True)
class Knob:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str


def _int(s: str) -> int:
    return int(s)


def _ranged(lo: int, hi: int) -> Callable[[str], int]:
    """An integer knob with a closed range: a value outside it is a typo, not a setting."""
    def parse(s: str) -> int:
        n = int(s)
        if not lo <= n <= hi:
            raise ValueError(s)
        return n
    return parse


def _choice(*values: str) -> Callable[[str], str]:
    def parse(s: str) -> str:
        if s not in values:
            raise ValueError(s)
        return s
    return parse


def _count(s: str) -> int:
    n = int(s)
    if n < 0:
        raise ValueError(s)
    return n


def _path(s: str) -> Path:
    return Path(s).expanduser()


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsr_compiler"


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("DSR_DEBUG", _ranged(0, 7), 0, "verbosity: 1 summary, 2 timings, 3 fusion decisions, 4 generated source, "
                               "5 IR per pass, 6 rewrite matches, 7 PTX; >=1 also shows tracebacks"),
    Knob("DSR_CACHE_DIR", _path, None, "artifact cache folder (default: $XDG_CACHE_HOME/dsr_compiler)"),
    Knob("DSR_NO_CACHE", _ranged(0, 1), 0, "1 disables the on-disk artifact cache (every compile is cold)"),
    Knob("DSR_BACKEND", _choice("auto", "cuda", "interpret"), "auto", "default runtime backend: auto | cuda | interpret"),
    Knob("DSR_MAX_HOST_BYTES", _count, 0, "largest host allocation a workload may plan (weights + example inputs + "
                                        "caches), checked before building; 0: the machine's physical memory"),
    Knob("DSR_COMPILE_TIMEOUT", _count, 600, "seconds one kernel's Triton compile may take (it runs in a reused "
                                             "worker process; past the limit: an error); 0: in process, no limit"),
    Knob("DSR_COMPILE_JOBS", _ranged(0, 64), 0, "kernels compiled at once, each in its own worker process; "
                                                 "0: the CPUs this process may use, at most 8"),
    Knob("DSR_EP_TIMEOUT_S", _ranged(1, 86400), 300, "seconds an expert-parallel rank waits for the others in "
                                                       "one exchange (the process group's timeout) before failing"),
    Knob("DSR_PTX", str, "", "kernel families emitted as direct PTX instead of Triton: 1/all (pointwise, "
                             "reduction, quant_fp8) or a comma list; unset/0: Triton for everything"),
)}


def get(name: str) -> Any:
    k = KNOBS.get(name)
    if k is None:
        raise KeyError(f"unknown knob {name}")
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return _default_cache() if name == "DSR_CACHE_DIR" else k.default
    try:
        return k.parse(raw)
    except (TypeError, ValueError):
        raise DsrError(f"bad value for {name}: {raw!r}", hint=k.help) from None


def check_all() -> None:
    """Parse every knob that is set, so that a malformed value is reported before any work starts,
    whichever stage would read it first (DsrError naming the knob)."""
    for name in KNOBS:
        get(name)


@contextlib.contextmanager
def scoped(**values: Any) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if k not in KNOBS:
                raise KeyError(f"unknown knob {k}")
            os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def debug(level: int) -> bool:
    return get("DSR_DEBUG") >= level


# ----------------------------------------------------------------------------- Triton's environment

TRITON_DEFAULTS = {"TRITON_DEFAULT_FP_FUSION": "1"}   # fused multiply-add in generated code (Triton's default)


def triton_defaults() -> None:
    """Set the Triton settings the compiler relies on, unless the user set them."""
    for k, v in TRITON_DEFAULTS.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def triton_interpret(on: bool) -> Iterator[None]:
    """Set (`on`) or clear TRITON_INTERPRET for the block and restore the previous value after: Triton
    reads it when a @triton.jit decorator runs and again, lazily, inside an interpreted launch."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def environ() -> dict[str, str]:
    """A copy of the whole environment, for a worker process that must see the same Triton settings."""
    return dict(os.environ)


__all__ = ["KNOBS", "TRITON_DEFAULTS", "Knob", "check_all", "debug", "environ", "get", "scoped", "triton_defaults",
           "triton_interpret"]
