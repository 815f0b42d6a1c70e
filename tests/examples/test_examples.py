"""Every examples/*.py, run as a user runs it: `python examples/NAME.py` in a fresh process.

Each example checks its own result against eager PyTorch and exits non-zero when the check fails,
so a run passes here when it exits 0 and prints its key line. The runs share one artifact cache in
a temporary folder (DSR_CACHE_DIR; TMPDIR too, so that what an example writes under the temp dir
stays there) and run two at a time, longest first: the whole module takes about a minute on two
cores. A new example must be listed in README.md's "## Examples" section and get a key line in
KEY_LINES below, or test_examples_are_listed fails.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# the line each example prints once its checks passed (each also exits 1 when a check fails)
KEY_LINES = {
    "dense_attention.py": "dense attention block bfloat16:",
    "fp8_policy.py": "check passed: every variant matches its eager reference; the policy changed the plan",
    "generate.py": "check passed: same tokens as eager, logits within tolerance",
    "grpo_loss.py": "check passed: loss and both gradients match eager autograd",
    "inspect_ir.py": "check passed: IR after fuse and the dump's IR files parse back",
    "torch_compile_backend.py": "check passed: torch.compile(backend='dsr') matches eager",
}
# slowest first, so that two workers finish together (measured here, cold artifact cache)
ORDER = ("generate.py", "dense_attention.py", "fp8_policy.py", "grpo_loss.py", "inspect_ir.py",
         "torch_compile_backend.py")
TIMEOUT_S = 600


def discovered() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def readme_listed() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Examples\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Examples' section"
    return sorted(set(re.findall(r"python examples/(\w+\.py)", m.group(1))))


def test_examples_are_listed():
    """A new example cannot go untested: the files, the README's list and KEY_LINES agree."""
    assert discovered() == readme_listed(), "examples/*.py vs README.md '## Examples'"
    assert discovered() == sorted(KEY_LINES), "examples/*.py vs KEY_LINES in this file"
    assert sorted(ORDER) == sorted(KEY_LINES)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DSR_CACHE_DIR=str(tmp / "dsr-cache"), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    for k in ("DSR_DEBUG", "DSR_NO_CACHE", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return p, time.perf_counter() - t


class Runs:
    """The selected examples, started two at a time on first use; `result(name)` waits for one."""

    def __init__(self, names: list[str], tmp: Path) -> None:
        self.names, self.tmp, self.env = names, tmp, _env(tmp)
        self.futures: dict[str, Future] = {}
        self.pool: ThreadPoolExecutor | None = None

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, float]:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=2)
            for n in sorted(self.names, key=lambda n: ORDER.index(n) if n in ORDER else -1):
                cwd = self.tmp / n.removesuffix(".py")
                cwd.mkdir()
                self.futures[n] = self.pool.submit(_run, [str(EXAMPLES / n)], cwd, self.env)
        return self.futures[name].result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    selected = [it.callspec.params["name"] for it in request.session.items
                if getattr(it, "originalname", "") == "test_example" and hasattr(it, "callspec")
                and Path(str(it.path)) == Path(__file__)]
    r = Runs(selected or discovered(), tmp_path_factory.mktemp("examples"))
    yield r
    r.close()


@pytest.mark.parametrize("name", discovered())
def test_example(name, runs):
    assert name in KEY_LINES, f"examples/{name}: add its key line to KEY_LINES"
    p, seconds = runs.result(name)
    shown = f"examples/{name} ({seconds:.0f} s), exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    assert p.returncode == 0, shown
    assert KEY_LINES[name] in p.stdout, shown
    assert "Traceback" not in p.stderr, shown


def test_bad_input_is_one_message(tmp_path):
    """A user error (a config path that does not exist) is the project's DsrError message, exit 2."""
    p, _ = _run([str(EXAMPLES / "generate.py"), "--config", str(tmp_path / "missing.json"),
                 "--checkpoint", str(tmp_path)], tmp_path, _env(tmp_path))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("generate.py: config file not found:"), p.stderr
    assert "Traceback" not in p.stderr and "hint:" in p.stderr
