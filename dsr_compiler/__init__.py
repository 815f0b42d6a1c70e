"""dsr_compiler: a compiler for DeepSeek-style models.

    import dsr_compiler as dsr
    g  = dsr.trace(module, example_inputs, dynamic={"x": {0: "T"}})
    cm = dsr.compile(module, example_inputs, dynamic={"x": {0: "T"}}, backend="auto")
    y  = cm(*inputs)
"""
__all__ = ["CompiledModule", "DsrError", "compile", "ir", "trace", "__version__"]


def __getattr__(name: str):
    """The public names load on first use, so that `dsrc` (dsr_compiler.cli) starts without torch and
    reports a Ctrl-C during the seconds-long torch / triton imports as exit 130, not a traceback."""
    import importlib
    if name == "__version__":
        return importlib.import_module("dsr_compiler.ir.version").VERSION
    if name in ("CompiledModule", "compile", "trace"):
        return getattr(importlib.import_module("dsr_compiler.api"), name)
    if name == "DsrError":
        return importlib.import_module("dsr_compiler.errors").DsrError
    if name == "ir":
        return importlib.import_module("dsr_compiler.ir")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
