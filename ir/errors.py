"""One error hierarchy for the whole compiler.

Every user-facing failure is a :class:`DsrError` whose message has the shape
``what: why`` followed by where (module path, IR window, file) and a hint. The CLI
prints the message and exits with code 2; nothing else is shown unless DSR_DEBUG>=1.
Errors are picklable (plain string fields only) so they cross process boundaries.
"""
from __future__ import annotations


class DsrError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it."""

    exit_code = 2

    def __init__(self, what: str, where: str = "", hint: str = "") -> None:
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(what, where, hint)

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}" if "\n" not in self.where else "  where:\n" + self.where)
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)

    def __reduce__(self):
        return (type(self), (self.what, self.where, self.hint))


class ConfigError(DsrError):
    """A model config file or field is missing or invalid."""


class TraceError(DsrError):
    """The frontend met something it cannot put into the IR."""


class VerifyError(DsrError):
    """An IR graph is not well-formed (raised by the verifier)."""


class GradError(DsrError):
    """The loss cannot be differentiated as asked (no rule for an op, not a scalar, bad name);
    raised by the `differentiate` pass and the ops' derivative rules."""


class ParseError(DsrError):
    """Text IR could not be parsed."""


class CodegenError(DsrError):
    """A kernel could not be generated or compiled."""


class RuntimeLaunchError(DsrError):
    """The runtime could not run a compiled plan (bad inputs, missing backend)."""


class CheckFailed(DsrError):
    """Compiled output differs from eager beyond tolerance (exit code 1)."""

    exit_code = 1
