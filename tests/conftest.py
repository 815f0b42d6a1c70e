"""Shared test set-up: hypothesis profiles (ci: derandomized, bounded) and common fixtures."""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---- progress of long property tests on a terminal (tests/fuzz_progress.py) ----------------------
import sys  # noqa: E402

import pytest  # noqa: E402
from fuzz_progress import ExampleProgress, wrap_inner_test  # noqa: E402

_progress: ExampleProgress | None = None


def pytest_configure(config):
    global _progress
    if not sys.stdout.isatty():
        return

    def write(line: str) -> None:    # the plugins are looked up late: conftest configures before them
        capman = config.pluginmanager.getplugin("capturemanager")
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if capman is None or reporter is None:
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)
    try:    # FUZZ_PROGRESS_S: seconds between lines (default 30)
        every = min(max(float(os.environ.get("FUZZ_PROGRESS_S", "30")), 0.0), 3600.0)
    except ValueError:
        every = 30.0
    _progress = ExampleProgress(write, every_s=every)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    fn = getattr(item, "obj", None)
    if _progress is None or not hasattr(getattr(fn, "hypothesis", None), "inner_test"):
        yield
        return
    wrap_inner_test(fn, _progress)
    _progress.start(item.nodeid)
    try:
        yield
    finally:
        _progress.end()
