"""Compile options: one typed, frozen, validated value shared by every way into the pipeline.

`dsr.compile`, `dsrc compile|run|ir` (cli.py), `torch.compile(backend="dsr")` (dynamo.py) and the
kernel build (codegen/build.py, whose artifact cache keys on the target) all take a `CompileOptions`
made by `CompileOptions.make`, which checks every field once, with the errors `dsr.compile` has
always given (DsrError / ConfigError naming the option, with a hint):

    fp8            False | True | dict of Fp8Policy fields | Fp8Policy  -> `fp8_policy` (None: off)
    target         "sm_90a"
    backend        auto | cuda | interpret (None: the DSR_BACKEND knob)
    mla            absorb | naive (decode form of MLA attention)
    ptx_families   families emitted as direct PTX: a sequence, True/"all" (None: the DSR_PTX knob)

The knobs are parsed first (`knobs.check_all`), so a malformed knob is reported before any option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsr_compiler import knobs
from dsr_compiler.errors import DsrError

TARGETS = ("sm_90a",)
MLA_FORMS = ("absorb", "naive")


@dataclass(frozen=True)
class CompileOptions:
    """What a compile is asked to do (validated by `make`; build one only through it)."""

    fp8_policy: Any = None                  # ir.passes.Fp8Policy, or None: every GEMM stays unquantized
    target: str = "sm_90a"
    backend: str = "auto"
    mla: str = "absorb"
    ptx_families: tuple[str, ...] = ()

    @classmethod
    def make(cls, *, fp8: Any = False, target: str = "sm_90a", backend: str | None = None, mla: str = "absorb",
             ptx_families: Any = None) -> "CompileOptions":
        """Check every option (and every knob that is set) and return them as one frozen value."""
        from dsr_compiler.codegen.ptx import resolve_ptx_families
        from dsr_compiler.ir.passes import Fp8Policy
        from dsr_compiler.runtime.device import BACKENDS
        knobs.check_all()
        backend = backend or knobs.get("DSR_BACKEND")
        if target not in TARGETS:
            raise DsrError(f"unknown target {target!r}", hint=f"supported: {', '.join(TARGETS)}")
        if backend not in BACKENDS:
            raise DsrError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
        if mla not in MLA_FORMS:
            raise DsrError(f"unknown MLA form mla={mla!r}",
                           hint="mla='absorb' (decode attends to the latent cache; default) or 'naive' (expand it)")
        policy = Fp8Policy.from_option(fp8)    # fp8: False | True | dict of policy fields | Fp8Policy
        ptx = resolve_ptx_families(ptx_families)   # None: the DSR_PTX knob
        return cls(fp8_policy=policy, target=target, backend=backend, mla=mla, ptx_families=tuple(ptx))

    def pass_options(self, grad_wrt: tuple[str, ...] = ()) -> dict[str, Any]:
        """The options the passes read (`PassContext.options`)."""
        out: dict[str, Any] = {"fp8": self.fp8_policy or False, "target": self.target, "mla": self.mla}
        if grad_wrt:
            out["grad_wrt"] = tuple(grad_wrt)
        return out

    def to_dict(self, dynamic: dict | None = None, grad_wrt: tuple[str, ...] = ()) -> dict[str, Any]:
        """Plain JSON values, as report.json's `options` shows them (with the compile's dynamic dims
        and gradient inputs, which belong to the module, not to the options)."""
        return {"fp8": self.fp8_policy.to_dict() if self.fp8_policy else False,
                "ptx_families": list(self.ptx_families), "target": self.target, "backend": self.backend,
                "dynamic": dynamic or {}, "mla": self.mla, **({"grad_wrt": list(grad_wrt)} if grad_wrt else {})}


__all__ = ["CompileOptions", "MLA_FORMS", "TARGETS"]
