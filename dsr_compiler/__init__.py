"""dsr_compiler: a compiler for DeepSeek-style models.

    import dsr_compiler as dsr
    g  = dsr.trace(module, example_inputs, dynamic={"x": {0: "T"}})
    cm = dsr.compile(module, example_inputs, dynamic={"x": {0: "T"}}, backend="auto")
    y  = cm(*inputs)
"""
__version__ = "0.1.0"

from dsr_compiler import ir  # noqa: E402
from dsr_compiler.api import CompiledModule, compile, trace  # noqa: E402
from dsr_compiler.errors import DsrError  # noqa: E402

__all__ = ["CompiledModule", "DsrError", "compile", "ir", "trace", "__version__"]
