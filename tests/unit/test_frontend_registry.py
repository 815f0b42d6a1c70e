"""Frontend registry: every lowering module is listed once, and registering a target, op or key a
second time is an error at import (so the order of `lowerings.MODULES` carries no meaning)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dsr_compiler.frontend import lowerings, registry


def test_every_lowering_module_is_listed_once():
    files = {p.stem for p in Path(lowerings.__file__).parent.glob("*.py") if p.stem != "__init__"}
    names = [m.__name__.rsplit(".", 1)[-1] for m in lowerings.MODULES]
    assert sorted(names) == sorted(files) and len(names) == len(set(names))


@pytest.mark.parametrize("register", [
    lambda: registry.lowers(torch.add)(lambda cx, input, other: None),
    lambda: registry.lowers("view")(lambda cx, input, *shape: None),
    lambda: registry.lowers_module(nn.Linear)(lambda cx, m, input: None),
    lambda: registry.lowers_leaf("moe")(lambda cx, m, args, kwargs: None),
    lambda: registry.lowers_function("rope")(lambda cx, fn, args, kwargs: None),
    lambda: registry.wrap_function("dsr_compiler.models.layers", "apply_rope", "rope"),
    lambda: registry.derive_param("experts.w13", registry.DERIVED_PARAMS["experts.w13"]),
], ids=["function", "method", "module", "leaf", "wrapped", "wrap", "derived"])
def test_registering_twice_is_an_error(register):
    tables = (registry.FUNCTION_HANDLERS, registry.METHOD_HANDLERS, registry.MODULE_HANDLERS,
              registry.LEAF_LOWERINGS, registry.FUNCTION_LOWERINGS, registry.WRAPPED_FUNCTIONS,
              registry.DERIVED_PARAMS)
    before = [dict(t) for t in tables]
    with pytest.raises(ValueError, match="registered twice"):
        register()
    assert [dict(t) for t in tables] == before          # nothing replaced
