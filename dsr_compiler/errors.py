"""The error hierarchy, re-exported from `dsr_compiler.ir.errors` (the IR sits at the bottom
of the dependency order, so the classes live there and every layer can raise them)."""
from dsr_compiler.ir.errors import (CheckFailed, CodegenError, ConfigError, DsrError, ParseError,  # noqa: F401
                                    RuntimeLaunchError, TraceError, VerifyError)

__all__ = ["CheckFailed", "CodegenError", "ConfigError", "DsrError", "ParseError", "RuntimeLaunchError",
           "TraceError", "VerifyError"]
