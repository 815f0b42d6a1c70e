"""A sweep of bad and hostile inputs through `dsrc` and the Python API, tallied by outcome.

Each case runs in a fresh process (so exit codes, tracebacks and hangs are seen as a user sees
them) inside its own scratch folder, with the artifact cache pointed into that folder. Outcomes:

    clean     exit 2 with a one-paragraph message and no traceback (what a bad input must get)
    accepted  exit 0 (right for the cases marked "ok": valid inputs near a limit)
    traceback a Python traceback on stderr, or an exit code other than 0/2/130
    wrong     an input that must be refused was accepted (a silent wrong result)
    lost      a file that existed before the command is gone or changed after it
    hang      still running at the time limit

    python tools/hostile.py                 # every case, table + totals
    python tools/hostile.py --only out      # cases whose name starts with "out"
    python tools/hostile.py --json FILE     # also write the per-case results

Not part of `make test` (a few minutes); tests/robustness/ holds the unit tests of each fix.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "deepseek-v3-tiny"


@dataclass
class Case:
    name: str
    argv: list[str] | None = None          # dsrc arguments
    code: str | None = None                # or a Python snippet (API cases); exit 2 on DsrError/TypeError
    files: dict[str, str | bytes] = field(default_factory=dict)   # scratch files created first
    env: dict[str, str] = field(default_factory=dict)
    expect: str = "error"                  # "error" | "ok"
    keep: tuple[str, ...] = ()             # scratch files that must survive unchanged
    timeout: float = 300.0


def _hf(**over) -> str:
    base = json.loads((ROOT / "dsr_compiler/models/specs/deepseek-v3.hf-config.json").read_text())
    base.update(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024, hidden_size=256,
                intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16, n_group=4, topk_group=2,
                num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
    base.update(over)
    return json.dumps(base)


def _api(body: str) -> str:
    """An API snippet: DsrError (and TypeError/ValueError for wrong argument types) is a clean refusal."""
    return ("import sys, torch\nimport dsr_compiler as dsr\nfrom dsr_compiler.errors import DsrError\n"
            "try:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines()) +
            "except (DsrError, TypeError) as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")


def cases() -> list[Case]:
    c: list[Case] = []
    mlp = ["compile", "--module", "mlp", "--no-fp8"]
    # ---- --out: never delete or overwrite what the project did not write
    c += [Case("out-existing-file", mlp + ["--out", "f.txt"], files={"f.txt": "precious"}, keep=("f.txt",)),
          Case("out-source-folder", mlp + ["--out", "src"], files={"src/main.py": "print(1)"}, keep=("src/main.py",)),
          Case("out-dot", mlp + ["--out", "."], files={"a.txt": "x"}, keep=("a.txt",)),
          Case("out-dotdot", mlp + ["--out", ".."]),
          Case("out-root", mlp + ["--out", "/"]),
          Case("out-cache", mlp + ["--out", "cache"], env={"DSR_CACHE_DIR": "cache"}, files={"cache/x": "1"},
               keep=("cache/x",)),
          Case("out-under-file", mlp + ["--out", "f.txt/sub"], files={"f.txt": "precious"}, keep=("f.txt",)),
          Case("out-empty-string", mlp + ["--out", ""]),
          Case("out-new-folder", mlp + ["--out", "newdump"], expect="ok"),
          Case("out-nested-new", mlp + ["--out", "a/b/c"], expect="ok")]
    # ---- selectors
    for v in ("0", "-1", "1e11", "100000000000", "abc", "99999999999999999999999"):
        c.append(Case(f"seq-{v}", mlp + ["--seq", v]))
        c.append(Case(f"batch-{v}", mlp + ["--batch", v]))
    c += [Case("model-unknown", mlp + ["--model", "gpt-5"]),
          Case("module-unknown", ["compile", "--module", "nope"]),
          Case("dtype-unknown", mlp + ["--dtype", "f64"]),
          Case("target-unknown", mlp + ["--target", "sm_80"]),
          Case("phase-on-mlp", mlp + ["--phase", "decode"]),
          Case("after-unknown", ["ir", "--module", "mlp", "--after", "nope"])]
    # ---- --fp8-policy
    pol = ["compile", "--module", "mlp", "--fp8-policy"]
    for i, v in enumerate(("{", "[]", "1", '"x"', '{"nope": 1}', '{"attn": "yes"}', '{"block": 0}',
                           '{"block": -128}', '{"block": 100}', '{"scale_fmt": "e5m2"}', '{"force": 3}',
                           '{"block": 1e400}', '{"attn": true, "attn": false}', "[" * 100000,
                           '{"block_m": 10000000000}')):
        c.append(Case(f"fp8-policy-{i}", pol + [v]))
    c.append(Case("fp8-policy-with-no-fp8", mlp + ["--fp8-policy", '{"attn": false}']))
    # ---- --config files
    cfgs = {
        "missing": None, "empty": "", "not-json": "hello", "list": "[]", "string": '"x"', "null": "null",
        "deep": "[" * 100000 + "]" * 100000, "deep-obj": '{"a":' * 50000 + "1" + "}" * 50000,
        "dup-key": _hf()[:-1] + ', "hidden_size": 512}',
        "hidden-1e12": _hf(hidden_size=10**12), "hidden-1e30": _hf(hidden_size=10**30),
        "hidden-neg": _hf(hidden_size=-256), "hidden-zero": _hf(hidden_size=0), "hidden-float": _hf(hidden_size=256.5),
        "hidden-str": _hf(hidden_size="256"), "hidden-bool": _hf(hidden_size=True), "hidden-null": _hf(hidden_size=None),
        "hidden-nan": _hf()[:-1].replace('"hidden_size": 256', '"hidden_size": NaN') + "}",
        "vocab-1e12": _hf(vocab_size=10**12), "layers-1e9": _hf(num_hidden_layers=10**9),
        "heads-0": _hf(num_attention_heads=0), "experts-0": _hf(n_routed_experts=0),
        "experts-65537": _hf(n_routed_experts=65537, n_group=1, topk_group=1),
        "experts-1e9": _hf(n_routed_experts=10**9, n_group=1, topk_group=1),
        "topk-gt-experts": _hf(num_experts_per_tok=17), "group-not-dividing": _hf(n_group=3),
        "topk-group-gt-groups": _hf(topk_group=5), "scoring-unknown": _hf(scoring_func="relu"),
        "rope-theta-neg": _hf(rope_theta=-1), "eps-neg": _hf(rms_norm_eps=-1e-6),
        "rope-scaling-list": _hf(rope_scaling=[1, 2]), "qlora-neg": _hf(q_lora_rank=-1),
        "kv-lora-1e12": _hf(kv_lora_rank=10**12), "moe-inter-1e12": _hf(moe_intermediate_size=10**12),
        "scale-nan": _hf()[:-1] + ', "routed_scaling_factor": NaN}',
        "binary": b"\x00\xff\xfe" * 100,
    }
    for name, text in cfgs.items():
        files = {} if text is None else {"config.json": text}
        c.append(Case(f"config-{name}", mlp + ["--config", "config.json"], files=files))
    c.append(Case("config-folder", mlp + ["--config", "cfgdir"], files={"cfgdir/x": "1"}))
    c.append(Case("config-dev-zero", mlp + ["--config", "/dev/zero"], timeout=60))
    c.append(Case("config-ok-hf", mlp + ["--config", "config.json"], files={"config.json": _hf()}, expect="ok"))
    # ---- environment knobs
    for knob, val in (("DSR_DEBUG", "abc"), ("DSR_DEBUG", "-5"), ("DSR_NO_CACHE", "yes"), ("DSR_BACKEND", "tpu"),
                      ("DSR_PTX", "bogus"), ("DSR_CACHE_DIR", "cachefile")):
        cache = val == "cachefile"     # the artifact cache is best effort: a warning, and the compile goes on
        c.append(Case(f"env-{knob}-{val}", mlp, env={knob: val}, files={"cachefile": "x"} if cache else {},
                      keep=("cachefile",) if cache else (), expect="ok" if cache else "error"))
    c.append(Case("run-backend-cuda-no-gpu", ["run", "--module", "mlp", "--no-fp8", "--backend", "cuda"]))
    c.append(Case("run-meta-weights", ["run", "--module", "moe", "--model", "deepseek-v3", "--no-fp8"]))
    # ---- IR text: parse must not run code
    payloads = ["().__class__.__base__.__subclasses__()", "__import__('os').system('touch pwned')",
                "(lambda: __import__('os').system('touch pwned'))()", "exec('open(\"pwned\",\"w\")')",
                "T.__class__", "'a'*10**10", "2**2**2**2**2**99", "(" * 100000 + "T" + ")" * 100000,
                "9" * 100000, "T +* 3", "getattr(T, 'x')"]
    for i, p in enumerate(payloads):
        dim_ir = f"graph g(%x : f32[{p}]) {{\n  %y : f32[{p}] = neg(%x)\n  return %y\n}}\n"
        attr_ir = f"graph g(%x : f32[4]) {{\n  %y : f32[4] = reshape(%x, shape=({p},))\n  return %y\n}}\n"
        for kind, text in (("dim", dim_ir), ("attr", attr_ir)):
            c.append(Case(f"ir-{kind}-{i}", code=_api("dsr.ir.parse(open('g.ir').read())\n"
                                                     "import os\nassert not os.path.exists('pwned'), 'payload ran'"),
                          files={"g.ir": text}, timeout=60))
    c += [Case("ir-bytes", code=_api("dsr.ir.parse(b'graph g() {\\n return\\n}')")),
          Case("ir-unknown-family", code=_api("dsr.ir.parse(open('g.ir').read())"), files={"g.ir": (
              "kernel @k1_nope_x(%x : f32[4]) family=nope {\n  %y : f32[4] = neg(%x)\n  return %y\n}\n"
              "graph g(%x : f32[4]) {\n  %y : f32[4] = call @k1_nope_x(%x)\n  return %y\n}\n")})]
    # ---- API misuse
    lin = "m = torch.nn.Linear(8, 8)\n"
    c += [Case("api-bare-tensor", code=_api(lin + "dsr.compile(m, torch.randn(4, 8))"), expect="ok"),  # one input
          Case("api-inputs-none", code=_api(lin + "dsr.compile(m, None)")),
          Case("api-inputs-str", code=_api(lin + "dsr.compile(m, 'x')")),
          Case("api-dynamic-bad-name", code=_api(lin + "dsr.compile(m, (torch.randn(4, 8),), dynamic={'nope': {0: 'T'}})")),
          Case("api-dynamic-bad-dim", code=_api(lin + "dsr.compile(m, (torch.randn(4, 8),), dynamic={'input': {5: 'T'}})")),
          Case("api-dynamic-bad-sym", code=_api(lin + "dsr.compile(m, (torch.randn(4, 8),), dynamic={'input': {0: '__import__'}})")),
          Case("api-fp8-str", code=_api(lin + "dsr.compile(m, (torch.randn(4, 8),), fp8='yes')")),
          Case("api-force-str", code=_api(lin + "dsr.compile(m, (torch.randn(4, 128),), fp8={'force': 'w'})")),
          Case("api-target", code=_api(lin + "dsr.compile(m, (torch.randn(4, 8),), target='sm_100')")),
          Case("api-call-wrong-shape", code=_api(lin + "cm = dsr.compile(m, (torch.randn(4, 8),))\ncm(torch.randn(4, 9))")),
          Case("api-call-wrong-dtype", code=_api(lin + "cm = dsr.compile(m, (torch.randn(4, 8),))\ncm(torch.randn(4, 8).double())")),
          Case("api-call-int", code=_api(lin + "cm = dsr.compile(m, (torch.randn(4, 8),))\ncm(torch.ones(4, 8, dtype=torch.int32))")),
          Case("api-call-count", code=_api(lin + "cm = dsr.compile(m, (torch.randn(4, 8),))\ncm()")),
          Case("api-not-module", code=_api("dsr.compile(42, (torch.randn(4, 8),))"))]
    return c


def run_case(case: Case, python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsr-hostile-") as d:
        base = Path(d)
        for rel, data in case.files.items():
            p = base / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
        before = {k: (base / k).read_bytes() for k in case.keep}
        env = {**os.environ, "DSR_CACHE_DIR": str(base / ".cache"), "TRITON_CACHE_DIR": str(base / ".triton"),
               **{k: (str(base / v) if k == "DSR_CACHE_DIR" else v) for k, v in case.env.items()}}
        env.pop("DSR_DEBUG", None) if "DSR_DEBUG" not in case.env else None
        cmd = ([python, "-m", "dsr_compiler", *case.argv] if case.argv is not None else [python, "-c", case.code or ""])
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=case.timeout)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = None, ""
        secs = time.perf_counter() - t
        lost = [k for k in case.keep if not (base / k).is_file() or (base / k).read_bytes() != before[k]]
        pwned = (base / "pwned").exists()
    if rc is None:
        outcome = "hang"
    elif lost or pwned:
        outcome = "lost"
    elif "Traceback (most recent call last)" in err or rc not in (0, 2, 130):
        outcome = "traceback"
    elif rc == 0:
        outcome = "accepted" if case.expect == "ok" else "wrong"
    else:
        outcome = "clean" if case.expect == "error" else "refused"
    last = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {"case": case.name, "outcome": outcome, "rc": rc, "seconds": round(secs, 1),
            "message": (last[-1] if outcome == "traceback" and last else (last[0] if last else ""))[:160]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the cases whose name starts with this")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write per-case results here")
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args(argv)
    todo = [k for k in cases() if k.name.startswith(a.only)]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        results = list(ex.map(lambda k: run_case(k, a.python), todo))
    totals: dict[str, int] = {}
    for r in results:
        totals[r["outcome"]] = totals.get(r["outcome"], 0) + 1
        if r["outcome"] not in ("clean", "accepted"):
            print(f"{r['outcome']:<10} {r['case']:<28} rc={r['rc']} {r['message']}")
    print(f"{len(results)} inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    bad = sum(totals.get(k, 0) for k in ("traceback", "wrong", "lost", "hang", "refused"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
