"""tests/thirdparty: transformers' modules (the `test` extra, installed by `make setup`); skipped without it."""
import pytest

pytest.importorskip("transformers")
