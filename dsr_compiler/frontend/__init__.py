"""dsr_compiler.frontend: PyTorch modules into the typed IR (see `trace.trace`)."""
from .trace import (FUNCTION_LOWERINGS, LEAF_LOWERINGS, WRAPPED_FUNCTIONS, TensorRef, TraceContext,
                    param_tensors, trace)

__all__ = ["FUNCTION_LOWERINGS", "LEAF_LOWERINGS", "WRAPPED_FUNCTIONS", "TensorRef", "TraceContext",
           "param_tensors", "trace"]
