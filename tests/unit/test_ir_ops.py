"""The op table: every type rule agrees with its own eager reference (dtype and shape), so
the verifier, the interpreter and the constant folder see the same types."""
from __future__ import annotations

import itertools

import pytest
import torch
from dsr_compiler.ir import OPS, DType, TensorType, run_graph
from dsr_compiler.ir.interp import bind_symbols
from dsr_compiler.ir.ops import POINTWISE, TypeRuleError
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT_DTYPES, graphs_with_inputs

COMPUTE_DTYPES = FLOAT_DTYPES + (DType.i32, DType.i64, DType.bool)
SIMPLE_POINTWISE = sorted(n for n, op in OPS.items() if op.kind == POINTWISE and not op.attrs
                          and op.arity[0] == op.arity[1] and n not in ("rope",))
# Type rules that accept bool where torch refuses it: the reference raises at run time.
BOOL_REFUSED_BY_TORCH = {"neg", "abs", "relu", "sub", "pow"}


def _tensor(t: TensorType) -> torch.Tensor:
    shape = tuple(int(d) for d in t.shape)
    g = torch.Generator().manual_seed(0)
    if t.dtype.is_float:
        return (torch.rand(shape, generator=g) + 0.5).to(t.dtype.torch)
    if t.dtype is DType.bool:
        return torch.rand(shape, generator=g) < 0.5
    return torch.randint(1, 4, shape, generator=g, dtype=t.dtype.torch)


def _agree(name: str, ts: list[TensorType], attrs: dict) -> None:
    op = OPS[name]
    try:
        (out,) = op.infer(ts, attrs)
    except TypeRuleError:
        return
    args = [_tensor(t) for t in ts]
    if DType.bool in [t.dtype for t in ts] and name in BOOL_REFUSED_BY_TORCH:
        return
    res = op.reference(*args, **op.with_defaults(attrs))
    assert res.dtype == out.dtype.torch, f"{name}{[str(t) for t in ts]}: rule says {out}, torch gives {res.dtype}"
    assert tuple(res.shape) == tuple(int(d) for d in out.shape), f"{name}{[str(t) for t in ts]}"


@pytest.mark.parametrize("name", SIMPLE_POINTWISE)
def test_pointwise_rules_match_references(name):
    n = OPS[name].arity[0]
    shape_sets = [[(2, 3)] * n, [()] + [(2, 3)] * (n - 1), [(2, 3)] + [()] * (n - 1), [(3,)] + [(2, 1)] * (n - 1)]
    dtype_sets = itertools.product(COMPUTE_DTYPES, repeat=n) if n < 3 else \
        [(DType.bool, a, b) for a in COMPUTE_DTYPES for b in COMPUTE_DTYPES]
    for dts in dtype_sets:
        for shapes in shape_sets:
            _agree(name, [TensorType(d, s) for d, s in zip(dts, shapes)], {})


def test_true_division_of_integers_is_float():
    (t,) = OPS["div"].infer([TensorType(DType.i32, (4,)), TensorType(DType.i64, ())], {})
    assert t == TensorType(DType.f32, (4,))
    (t,) = OPS["div"].infer([TensorType(DType.bf16, (4,)), TensorType(DType.i64, ())], {})
    assert t.dtype is DType.bf16


@pytest.mark.parametrize("name", ["sum", "mean", "amax", "softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
def test_reduction_rules_match_references(name, dtype):
    x = TensorType(dtype, (2, 3, 4))
    for dim in range(-3, 3):
        if name in ("softmax", "log_softmax"):
            _agree(name, [x], {"dim": dim})
            continue
        for keep in (True, False, None):
            _agree(name, [x], {"dim": dim} if keep is None else {"dim": dim, "keepdim": keep})


@pytest.mark.parametrize("src", COMPUTE_DTYPES)
@pytest.mark.parametrize("dst", COMPUTE_DTYPES + (DType.fp8e4m3, DType.fp8e5m2))
def test_cast_and_const_rules_match_references(src, dst):
    _agree("cast", [TensorType(src, (3,))], {"dtype": dst})
    for v in (1, 2.5, True):
        _agree("const", [], {"value": v, "dtype": src})


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gemm_norm_layout_rules_match_references(dtype):
    _agree("linear", [TensorType(dtype, (2, 5, 4)), TensorType(dtype, (3, 4))], {})
    _agree("linear", [TensorType(dtype, (5, 4)), TensorType(dtype, (3, 4)), TensorType(dtype, (3,))], {})
    _agree("matmul", [TensorType(dtype, (2, 1, 5, 4)), TensorType(dtype, (3, 4, 6))], {})
    _agree("rms_norm", [TensorType(dtype, (5, 4)), TensorType(DType.f32, (4,))], {"eps": 1e-06})
    _agree("attention", [TensorType(dtype, (2, 5, 4)), TensorType(dtype, (2, 7, 4)), TensorType(dtype, (2, 7, 3))],
           {"causal": True, "scale": 0.5})
    _agree("rope", [TensorType(dtype, (5, 2, 4)), TensorType(dtype, (5, 1, 4)), TensorType(dtype, (5, 1, 4))], {})
    _agree("embedding", [TensorType(dtype, (5, 4)), TensorType(DType.i32, (2, 3))], {})
    _agree("cat", [TensorType(dtype, (2, 4)), TensorType(dtype, (3, 4))], {"dim": 0})
    _agree("reshape", [TensorType(dtype, (2, 6))], {"shape": (3, 1, 4)})
    _agree("permute", [TensorType(dtype, (2, 3, 4))], {"dims": (2, 0, 1)})
    _agree("expand", [TensorType(dtype, (3, 1))], {"shape": (2, 3, 5)})
    _agree("where", [TensorType(DType.bool, (3, 1)), TensorType(dtype, (4,)), TensorType(DType.f32, ())], {})


@given(start=st.integers(0, 9), end=st.one_of(st.none(), st.integers(1, 12)), step=st.integers(1, 4),
       size=st.integers(1, 9), dim=st.integers(-2, 1))
def test_slice_rule_matches_reference(start, end, step, size, dim):
    _agree("slice", [TensorType(DType.f32, (size, 3) if dim in (0, -2) else (3, size))],
           {"dim": dim, "start": start, "end": end, "step": step})


@given(graphs_with_inputs())
def test_interpreted_values_have_their_declared_types(gi):
    g, args = gi
    env = bind_symbols([v.type for v in g.inputs], args)
    vals = g.values()
    outs = run_graph(g.replace(outputs=tuple(vals)), args)    # every value, not only the outputs
    for name, t in zip(vals, outs):
        want = vals[name].type
        assert t.dtype == want.dtype.torch, f"%{name}: {want} vs {t.dtype}"
        assert tuple(t.shape) == want.concrete_shape(env), f"%{name}: {want} vs {tuple(t.shape)}"
