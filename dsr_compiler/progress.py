"""Progress lines for long work (`dsrc compile|run|bench` of V3-width modules): one line per stage
and per kernel on stderr, rewritten in place, shown only when stderr is a terminal, only once the
work has taken `after_s` seconds (short compiles print nothing), and never with `--quiet`.

    p = Progress.for_cli(quiet=args.quiet)
    p.stage("trace")                     # [dsrc 2.1 s] trace
    p.step("codegen", 3, 29, "k3_gemm")  # [dsrc 4.0 s] codegen 3/29 k3_gemm
    p.part("cold compile")               # [dsrc 9.0 s] cold compile: start (then "cold compile: trace", ...)
    p.done()                             # clears the line
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True, after_s: float = 2.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.after_s = after_s
        self.t0 = time.perf_counter()
        self._shown = False
        self._width = 0
        self.label = ""             # what the stages belong to (`dsrc bench`: "cold compile", ...)

    @classmethod
    def for_cli(cls, quiet: bool = False, stream: TextIO | None = None) -> "Progress":
        s = stream if stream is not None else sys.stderr
        try:
            tty = bool(s.isatty())
        except (AttributeError, ValueError):     # closed or a stream without isatty
            tty = False
        return cls(s, enabled=tty and not quiet)

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if elapsed < self.after_s:
            return
        line = f"[dsrc {elapsed:.1f} s] {self.label + ': ' if self.label else ''}{text}"[:160]
        pad = " " * max(0, self._width - len(line))
        try:
            self.stream.write("\r" + line + pad)
            self.stream.flush()
        except (OSError, ValueError):            # a closed terminal: progress is never worth an error
            self.enabled = False
            return
        self._shown, self._width = True, len(line)

    def stage(self, name: str) -> None:
        self._line(name)

    def part(self, label: str) -> None:
        """Start a part of a longer job (`dsrc bench`): later stages and steps read `label: stage`."""
        self.label = label
        self._line("start")

    def step(self, stage: str, i: int, n: int, what: str = "") -> None:
        self._line(f"{stage} {i}/{n} {what}".rstrip())

    def done(self) -> None:
        if self._shown and self.enabled:
            try:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._shown = False


__all__ = ["Progress"]
