"""Progress for long property tests (`make fuzz` runs for hours): while a hypothesis test runs, a line
every `every_s` seconds with the examples run so far, and a last line when it ends, written between
pytest's own output. Only on a terminal (conftest.py decides): a log file or CI gets nothing.

    fuzz: tests/robustness/test_checks.py::test_random_graphs_compile_and_match_the_reference  812 examples, 5.0 min
"""
from __future__ import annotations

import time
from typing import Callable


class ExampleProgress:
    def __init__(self, write: Callable[[str], None], every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.every_s, self.clock = write, every_s, clock
        self.test = ""
        self.count = 0
        self.t0 = self.last = 0.0
        self.shown = False

    def start(self, test: str) -> None:
        self.test, self.count, self.shown = test, 0, False
        self.t0 = self.last = self.clock()

    def example(self) -> None:
        self.count += 1
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._line("")

    def end(self) -> None:
        if self.shown and self.test:
            self._line(", done")
        self.test = ""

    def _line(self, tail: str) -> None:
        s = self.clock() - self.t0
        took = f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"
        # the first line of a test starts on a line of its own (pytest -q leaves the cursor after its dots)
        self.write(("" if self.shown else "\n") + f"fuzz: {self.test}  {self.count:,} examples, {took}{tail}")
        self.shown = True


def wrap_inner_test(fn, progress: ExampleProgress):
    """`fn.hypothesis.inner_test` (hypothesis lets plugins replace it) counted once per example."""
    inner = fn.hypothesis.inner_test
    if getattr(inner, "_counted", False):
        return

    def counted(*args, **kwargs):
        progress.example()
        return inner(*args, **kwargs)
    counted._counted = True
    fn.hypothesis.inner_test = counted
