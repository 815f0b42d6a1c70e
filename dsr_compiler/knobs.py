"""The knobs (`DSR_*` environment variables), re-exported from `dsr_compiler.ir.knobs` (they sit at
the bottom of the layers so that ir, codegen and runtime read them too)."""
from dsr_compiler.ir.knobs import (  # noqa: F401
    KNOBS,
    TRITON_DEFAULTS,
    Knob,
    check_all,
    debug,
    environ,
    get,
    scoped,
    triton_defaults,
    triton_interpret,
)

__all__ = ["KNOBS", "TRITON_DEFAULTS", "Knob", "check_all", "debug", "environ", "get", "scoped", "triton_defaults",
           "triton_interpret"]
