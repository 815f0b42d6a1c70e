"""The progress lines of long property tests (tests/fuzz_progress.py): a line per interval with the
examples counted through hypothesis' inner test, a last line only when one was shown."""
from __future__ import annotations

from fuzz_progress import ExampleProgress, wrap_inner_test
from hypothesis import given, settings
from hypothesis import strategies as st


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_line_per_interval_and_a_last_line():
    lines: list[str] = []
    clock = Clock()
    p = ExampleProgress(lines.append, every_s=30.0, clock=clock)
    p.start("t.py::test_x")
    for _ in range(5):
        clock.t += 10.0
        p.example()
    assert lines == ["\nfuzz: t.py::test_x  3 examples, 30 s"]
    clock.t += 200.0
    p.end()
    assert lines[-1] == "fuzz: t.py::test_x  5 examples, 4.2 min, done"


def test_a_short_test_prints_nothing():
    lines: list[str] = []
    p = ExampleProgress(lines.append, every_s=30.0, clock=Clock())
    p.start("t.py::test_y")
    p.example()
    p.end()
    assert lines == []


def test_every_hypothesis_example_is_counted_once():
    lines: list[str] = []
    p = ExampleProgress(lines.append, every_s=1e9)
    seen: list[int] = []

    @settings(database=None, derandomize=True)
    @given(st.integers())
    def prop(x):
        seen.append(x)

    wrap_inner_test(prop, p)
    wrap_inner_test(prop, p)          # parametrized items share the function: wrapped once
    p.start("prop")
    prop()
    assert p.count == len(seen) > 0
