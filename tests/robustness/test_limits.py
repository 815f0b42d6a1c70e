"""Bounded resources (issue 8): the MoE router and dispatch tile over experts, sizes that cannot fit are
ConfigErrors naming the bytes, config JSON is parsed with bounds, a stuck compile is an error.

The router tests run the expert-chunked kernel on the Triton interpreter with chunks much smaller
than E (several chunks, groups that straddle chunks, ties across chunks) against the op's eager
reference, and check that no rendered tile grows with E (65,536 experts render to the same tile
sizes as 256) and that the kernel compiles for sm_90a without spills; the dispatch tests do the
same for its counting sort (chunks of slots, experts and rows).
"""
from __future__ import annotations

import ast
import json
import math

import pytest
import torch
from dsr_compiler.codegen import compile_triton, lower_kernel, render
from dsr_compiler.ir import OPS, DType, GraphBuilder, Kernel, Node, TensorType, Value, run_graph, verify
from dsr_compiler.ir.types import sym

from tests.codegen.codegen_helpers import run_interpreted
from tests.tolerances import assert_close

T = sym("T")
f32, bf16 = DType.f32, DType.bf16


# ----------------------------------------------------------------------------- MoE router tiling

def _router(e: int, h: int, *, n_group: int = 1, topk_group: int = 1, topk: int = 4, scoring: str = "sigmoid",
            bias: bool = False, dtype: DType = f32, norm: bool = True, **kattrs: int) -> Kernel:
    ins = [("x", TensorType(dtype, (T, h))), ("gw", TensorType(dtype, (e, h)))]
    if bias:
        ins.append(("bias", TensorType(f32, (e,))))
    attrs = {"topk": topk, "n_group": n_group, "topk_group": topk_group, "scoring": scoring,
             "group_score": "top2_sum" if bias else "max", "route_scale": 2.5, "norm_topk": norm}
    b = GraphBuilder("k1_moe_router_limits")
    for name, t in ins:
        b.add_input(name, t)
    outs = OPS["moe_router"].infer([t for _, t in ins], attrs)
    vals = tuple(Value(f"out{j}", t) for j, t in enumerate(outs))
    b.add(Node(vals, "moe_router", tuple(n for n, _ in ins), attrs, origin="test.moe_router"))
    g = verify(b.build([v.name for v in vals]))
    return Kernel(g.name, "moe_router", g, kattrs)


def _run_router(k: Kernel, inputs: list[torch.Tensor]) -> torch.Tensor:
    got = run_interpreted(k, inputs)
    want = run_graph(k.body, inputs)
    assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]), f"ids differ:\n{got[1]}\nvs\n{want[1]}"
    return got[1]


def _inputs(e: int, h: int, tokens: int, seed: int, bias: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, h, generator=g) / math.sqrt(h)
    x = torch.randn(tokens, h, generator=g)
    return [x, w] + ([0.05 * torch.randn(e, generator=g)] if bias else [])


# chunks of 16 experts: E=64 -> 4 chunks; E=60 in 3 groups of 20 -> groups straddle chunks and
# their members are read in two [.., 16] pieces; block_w=4 normalizes the 7 weights in two chunks.
ROUTER_CASES = [
    dict(e=64, topk=6, scoring="sigmoid"),
    dict(e=64, topk=5, scoring="softmax"),
    dict(e=60, n_group=3, topk_group=2, topk=7, scoring="sigmoid", bias=True),
    dict(e=60, n_group=3, topk_group=1, topk=4, scoring="softmax"),
    dict(e=64, n_group=64, topk_group=9, topk=8, scoring="sigmoid", bias=True),
    dict(e=48, n_group=2, topk_group=2, topk=7, scoring="softmax", block_w=4),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_router_chunked_matches_reference(case):
    k = _router(h=24, **{"block_e": 16, **case})
    spec = lower_kernel(k, 1)
    assert spec.param("BLOCK_E") == 16 and -(-case["e"] // 16) > 1
    _run_router(k, _inputs(case["e"], 24, 19, seed=case["e"] + case["topk"], bias=case.get("bias", False)))


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_router_chunked_ties_go_to_lower_index(scoring):
    """Experts 3, 20, 37, 50 share a gate row (four 16-expert chunks, four groups) that clearly
    wins: they tie exactly, the group scores tie too, so groups 0-2 are kept and the three experts
    come first in index order, as in the eager stable sort. Inputs are multiples of 2^-8 and 2^-6,
    so every logit is exact in fp32 whatever the summation order (eager, BLAS, tl.dot)."""
    e, h = 64, 32
    g = torch.Generator().manual_seed(5)
    base = torch.nn.functional.normalize(torch.randn(h, generator=g), dim=0)
    w = torch.round(0.02 * torch.randn(e, h, generator=g) * 256) / 256
    w[[3, 20, 37, 50]] = torch.round(base * 256) / 256
    x = torch.round((0.05 * torch.randn(9, h, generator=g) + 2.0 * base) * 64) / 64
    k = _router(e, h, n_group=4, topk_group=3, topk=6, scoring=scoring, block_e=16)
    ids = _run_router(k, [x, w])
    assert all(r[:3] == [3, 20, 37] and 50 not in r for r in ids.tolist()), ids


def _tile_sizes(src: str) -> list[int]:
    """Every constant size of a tl.arange / tl.full in the rendered kernel."""
    sizes = []
    for node in ast.walk(ast.parse(src)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr == "arange" and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
            sizes.append(node.args[1].value)
        if node.func.attr == "full" and node.args and isinstance(node.args[0], ast.List):
            sizes += [d.value for d in node.args[0].elts if isinstance(d, ast.Constant)]
    return sizes


@pytest.mark.parametrize("n_group", [1, 64, 65536])
def test_router_tiles_do_not_grow_with_experts(n_group):
    k = _router(65536, 7168, n_group=n_group, topk_group=min(8, n_group), topk=8, bias=n_group > 1, dtype=bf16)
    sizes = _tile_sizes(render(lower_kernel(k, 1)))
    assert sizes and max(sizes) <= 256, sorted(set(sizes))


@pytest.mark.parametrize("e,n_group", [(1024, 8), (65536, 65536)])
def test_router_compiles_without_spills(e, n_group):
    """Before tiling, E=1024 spilled 3.8 KB and E=65,536 ran LLVM for 15+ minutes."""
    k = _router(e, 1024, n_group=n_group, topk_group=8, topk=8, bias=True, dtype=bf16)
    spec = lower_kernel(k, 1)
    ck = compile_triton(spec, render(spec))
    assert ck.spills == 0 and ck.stack == 0, ck.ptxas_log


# ----------------------------------------------------------------------------- MoE dispatch tiling

def _dispatch(e: int, topk: int, bm: int, ids_dtype: DType = DType.i32, **kattrs: int) -> Kernel:
    ids_t = TensorType(ids_dtype, (T, topk))
    attrs = {"n_experts": e, "block_m": bm}
    b = GraphBuilder("k2_moe_dispatch_limits")
    b.add_input("ids", ids_t)
    vals = tuple(Value(f"out{j}", t) for j, t in enumerate(OPS["moe_dispatch"].infer([ids_t], attrs)))
    b.add(Node(vals, "moe_dispatch", ("ids",), attrs, origin="test.moe_dispatch"))
    return Kernel("k2_moe_dispatch_limits", "moe_dispatch", verify(b.build([v.name for v in vals])), kattrs)


# chunks of 16 slots, 16 experts and 16 rows/blocks: several of each, experts whose slots straddle
# slot chunks, empty experts between full ones, ids outside 0..E-1 (no slot), i64 ids
DISPATCH_CASES = [
    dict(e=40, topk=3, bm=16, tokens=23, hi=40),
    dict(e=70, topk=2, bm=32, tokens=41, hi=3),          # skewed: experts 0..2 take every slot
    dict(e=33, topk=4, bm=16, tokens=17, hi=33, junk=True),
    dict(e=5, topk=1, bm=16, tokens=50, hi=5, dtype=DType.i64, junk=True),
]


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dispatch_chunked_matches_reference(case):
    k = _dispatch(case["e"], case["topk"], case["bm"], case.get("dtype", DType.i32),
                  block_s=16, block_e=16, block_r=16)
    g = torch.Generator().manual_seed(case["e"] + case["tokens"])
    ids = torch.randint(0, case["hi"], (case["tokens"], case["topk"]), generator=g)
    if case.get("junk"):
        ids.view(-1)[::7] = -1
        ids.view(-1)[3::11] = case["e"] + 2**32      # wraps to a valid id if narrowed to int32 first
    ids = ids.to(case.get("dtype", DType.i32).torch)
    got = run_interpreted(k, [ids])
    want = run_graph(k.body, [ids])
    for name, a, b in zip(("rows", "blocks"), got, want):
        assert torch.equal(a, b), f"{name} differ:\n{a}\nvs\n{b}"


def test_dispatch_tiles_do_not_grow_with_experts():
    sizes = _tile_sizes(render(lower_kernel(_dispatch(65536, 8, 64), 1)))
    assert sizes and max(sizes) <= 1024, sorted(set(sizes))


@pytest.mark.parametrize("e", [1024, 65536])
def test_dispatch_compiles_without_spills(monkeypatch, e):
    """Before tiling, E=1,024 took 191 registers, E=4,096 spilled 6 KB and E=65,536 did not compile
    in 5 minutes: the deadline turns a compile that grows with E into a CodegenError here."""
    monkeypatch.setenv("DSR_COMPILE_TIMEOUT", "60")
    spec = lower_kernel(_dispatch(e, 8, 64), 1)
    ck = compile_triton(spec, render(spec))
    assert ck.spills == 0 and ck.stack == 0 and ck.registers <= 128, ck.ptxas_log


# ----------------------------------------------------------------------------- config JSON and sizes

def _tiny(**changes) -> dict:
    from dsr_compiler.models.config import _TINY
    return {**_TINY, **changes}


def _write(tmp_path, text: str, name: str = "config.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _dsrc(capsys, *argv: str) -> tuple[int, str]:
    """`dsrc` in-process: (exit code, stderr); argparse errors exit through SystemExit."""
    from dsr_compiler.cli import main
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


@pytest.mark.parametrize("text,match", [
    (json.dumps(_tiny(hidden_size=10**12)), r"'hidden_size' = 1000000000000: above the supported limit 65,536; "
                                            r"the weight embed \[1024, 1000000000000\] alone would need "
                                            r"2,048,000,000,000,000 bytes"),
    (json.dumps(_tiny(hidden_size=10**30)), r"'hidden_size' = 10{30}: above the supported limit .* bytes"),
    (json.dumps(_tiny(n_routed_experts=65537 * 4, n_group=4)), r"'n_routed_experts' = 262148: above the supported "
                                                               r"limit 65,536"),
    (json.dumps(_tiny(vocab_size=1 << 20, hidden_size=1 << 14)), r"weight embed \[1048576, 16384\] has "
                                                                 r"17,179,869,184 elements \(34,359,738,368 bytes"),
    ("[" * 100_000 + "]" * 100_000, r"JSON nests 100000 levels deep, more than the 32 supported"),
    (json.dumps(_tiny())[:-1] + ', "hidden_size": 512}', r"duplicate key 'hidden_size' in JSON: the values 256 and "
                                                         r"512 disagree"),
    (json.dumps(_tiny(rope_scaling=None))[:-1] + ', "quantization_config": {"fmt": "e4m3", "fmt": "e5m2"}}',
     r"duplicate key 'fmt' in JSON: the values 'e4m3' and 'e5m2' disagree"),
    (json.dumps(_tiny(rope_scaling=None))[:-1] + ', "foo": Infinity}', r"Infinity is not a JSON number"),
    (json.dumps(_tiny(rope_scaling=None))[:-1] + ', "foo": [NaN]}', r"NaN is not a JSON number"),
    ("[" + json.dumps(_tiny()) + "]", r"config must be a JSON object, got list"),
    (json.dumps(_tiny(hidden_size=True)), r"'hidden_size' = True: expected an integer, got bool"),
    (json.dumps(_tiny(hidden_size=7168.0)), r"'hidden_size' = 7168.0: expected an integer, got float"),
    (json.dumps(_tiny(hidden_size=-7168)), r"'hidden_size' = -7168: must be a positive integer"),
    (json.dumps(_tiny()) + " " * (1 << 20), r"config file is larger than 1,048,576 bytes"),
], ids=["hidden1e12", "hidden1e30", "experts", "matrix", "deep", "dup", "dup-nested", "inf", "nan", "list", "bool",
        "float", "negative", "big-file"])
def test_bad_config_files_are_config_errors(tmp_path, capsys, text, match):
    import re

    from dsr_compiler.errors import ConfigError
    from dsr_compiler.models import ModelConfig
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_json(p)
    assert str(p) in str(e.value)                                   # names the file
    rc, err = _dsrc(capsys, "ir", "--config", str(p), "--module", "mlp")
    assert rc == 2 and re.search(match, err), err


def test_supported_limits_are_accepted():
    from dsr_compiler.models import ModelConfig
    cfg = ModelConfig.from_dict(_tiny(n_routed_experts=65536, n_group=65536, topk_group=8, hidden_size=16384,
                                      vocab_size=32767))
    assert cfg.n_routed_experts == 65536


# ----------------------------------------------------------------------------- --batch / --seq and host bytes

@pytest.mark.parametrize("argv,match", [
    (("--seq", "1e11"), r"argument --seq: '1e11' is not an integer; use a whole number in 1 .. 2,147,483,647"),
    (("--seq", "1e3"), r"argument --seq: '1e3' is not an integer \(write 1000\)"),
    (("--seq", "100000000000"), r"argument --seq: 100000000000 is outside 1 .. 2,147,483,647"),
    (("--batch", "0"), r"argument --batch: 0 is outside 1 .. 2,147,483,647"),
    (("--batch", "-3"), r"argument --batch: -3 is outside"),
    (("--seq", "2147483647"), r"the workload needs 2,199,024,828,416 bytes of host memory \(params 1,573,888, "
                              r"example inputs 2,199,023,254,528\)"),
    (("--batch", "65536", "--seq", "65536"), r"--batch x --seq = 4,294,967,296 tokens: more than the 2,147,483,647"),
    (("--module", "decoder", "--batch", "4096", "--seq", "500000"), r"caches 1,310,720,000,000"),
    (("--module", "grpo", "--seq", "4000000"), r"logits to draw the old/ref log-probs 131,072,000,000"),
    (("--fp8-policy", '{"attn": false, "attn": true}'), r"duplicate key 'attn' in JSON"),
    (("--fp8-policy", "[" * 5000 + "]" * 5000), r"JSON nests 5000 levels deep"),
])
def test_sizes_that_cannot_fit_are_refused_before_building(capsys, argv, match):
    import re
    args = dict(zip(argv[::2], argv[1::2]))
    from dsr_compiler import knobs
    with knobs.scoped(DSR_MAX_HOST_BYTES=1 << 36):      # the same answer on any machine
        rc, err = _dsrc(capsys, "compile", *(() if "--module" in args else ("--module", "mlp")), *argv)
    assert rc == 2 and re.search(match, err), err


def test_host_limit_knob(capsys):
    from dsr_compiler import knobs
    from dsr_compiler.errors import ConfigError
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build, check_footprint
    cfg = ModelConfig.named("deepseek-v3-tiny")
    parts = check_footprint(cfg, "moe", 2, 8, torch.float32)
    assert parts["example inputs"] == 16 * 256 * 4 and parts["params"] > 0
    with knobs.scoped(DSR_MAX_HOST_BYTES=sum(parts.values()) - 1):
        with pytest.raises(ConfigError, match=f"needs {sum(parts.values()):,} bytes"):
            build(cfg, "moe", 2, 8)
    with knobs.scoped(DSR_MAX_HOST_BYTES=-1), pytest.raises(Exception, match="DSR_MAX_HOST_BYTES"):
        check_footprint(cfg, "moe", 2, 8, torch.float32)
    with knobs.scoped(DSR_MAX_HOST_BYTES=1 << 36), pytest.raises(ConfigError, match="example inputs 1,024,000,000,000"):
        build(cfg, "mlp", 1, 10**9)                     # the Python API too, not only the CLI


# ----------------------------------------------------------------------------- compile deadline

def _slow_source(seconds: int) -> tuple:
    """A real router spec whose rendered module sleeps at import: the worker's compile hangs."""
    spec = lower_kernel(_router(64, 32, topk=2), 1)
    return spec, f"import time\ntime.sleep({seconds})\n" + render(spec)


def _worker_proc():
    from dsr_compiler.codegen import compile as cc
    return cc._WORKER[0] if cc._WORKER else None


def test_compile_past_the_deadline_is_a_clean_error(monkeypatch):
    import time

    from dsr_compiler.errors import CodegenError
    from dsr_compiler.codegen import compile as cc
    cc.stop_workers()                   # warm workers of earlier builds: the one below is then the only one
    spec, src = _slow_source(120)
    monkeypatch.setenv("DSR_COMPILE_TIMEOUT", "1")
    t0 = time.perf_counter()
    with pytest.raises(CodegenError, match=rf"compiling {spec.name} took longer than 1 s \(DSR_COMPILE_TIMEOUT\)"):
        compile_triton(spec, src)
    assert time.perf_counter() - t0 < 60 and _worker_proc() is None      # the worker was stopped
    monkeypatch.setenv("DSR_COMPILE_TIMEOUT", "soon")
    with pytest.raises(CodegenError, match="bad value for DSR_COMPILE_TIMEOUT"):
        compile_triton(spec, src)


def test_ctrl_c_during_a_compile_ends_the_worker(monkeypatch):
    import os
    import signal
    import threading

    from dsr_compiler.codegen import compile as cc
    cc.stop_workers()
    spec, src = _slow_source(120)
    monkeypatch.setenv("DSR_COMPILE_TIMEOUT", "600")
    seen = []
    timer = threading.Timer(3.0, lambda: (seen.append(_worker_proc()), os.kill(os.getpid(), signal.SIGINT)))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            compile_triton(spec, src)
    finally:
        timer.cancel()
    assert seen and seen[0] is not None and seen[0].poll() is not None   # it ran, and it was ended
    assert _worker_proc() is None


def test_non_finite_numbers_from_python_are_refused():
    """The JSON reader refuses NaN literals; a dict built in Python is checked by the validator."""
    from dsr_compiler.errors import ConfigError
    from dsr_compiler.models import ModelConfig
    rope = {**_tiny()["rope_scaling"], "mscale_all_dim": float("nan")}
    with pytest.raises(ConfigError, match=r"'rope_scaling.mscale_all_dim' = nan: must be finite"):
        ModelConfig.from_dict(_tiny(rope_scaling=rope))
    with pytest.raises(ConfigError, match=r"'routed_scaling_factor' = inf"):
        ModelConfig.from_dict(_tiny(routed_scaling_factor=float("inf")))
