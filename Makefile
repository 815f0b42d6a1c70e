# The two set-up commands of the README. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: demo test lint fuzz setup clean

$(BIN)/dsrc: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/dsrc

setup: $(BIN)/dsrc

demo: setup
	$(BIN)/dsrc compile --out out/demo
	$(BIN)/dsrc run --backend interpret --check

test: setup
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q tests

# The linter (pinned in pyproject's dev extras) and the size report; .ci/run runs both before the tests.
lint: setup
	$(BIN)/ruff --version 2>/dev/null | grep -q "ruff 0.17.6" || $(BIN)/pip install -q ruff==0.17.6
	$(BIN)/ruff check .
	$(BIN)/python tools/sz.py --check

# Every property test at the fuzz profile's budget (tests/strategies.py `examples`), including the
# compiled-module tests and 10,000 random graphs through passes + codegen + interpreter
# (tests/robustness/test_checks.py); hours on a CPU. Statistics print the examples each test ran.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q --hypothesis-show-statistics tests

clean:
	rm -rf out .dsr_cache
