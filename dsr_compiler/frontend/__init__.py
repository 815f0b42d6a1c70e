"""dsr_compiler.frontend: PyTorch modules into the typed IR (see `tracer.trace`; the files are
mapped in docs/architecture.md)."""
from .context import TensorRef, TraceContext
from .registry import (DERIVED_PARAMS, FUNCTION_LOWERINGS, LEAF_LOWERINGS, WRAPPED_FUNCTIONS, ParamDerivation,
                       lowers, lowers_function, lowers_leaf, lowers_module)
from .tracer import derived_declarations, param_tensors, trace

__all__ = ["DERIVED_PARAMS", "FUNCTION_LOWERINGS", "LEAF_LOWERINGS", "WRAPPED_FUNCTIONS", "ParamDerivation",
           "TensorRef", "TraceContext", "lowers", "lowers_function", "lowers_leaf", "lowers_module",
           "derived_declarations", "param_tensors", "trace"]
