"""Peak memory and DRAM traffic: the compiled GRPO loss + backward vs eager autograd (not a unit test).

    .venv/bin/python bench/grpo_memory.py            # both scales (the small one runs the interpreter: ~minutes)
    .venv/bin/python bench/grpo_memory.py --skip-run # model only (no interpreter run)

Two scales, f32 and bf16 heads:

* DeepSeek-V3 training scale, N·L = 16,384 tokens, H = 7,168, V = 129,280: nothing is allocated.
  Eager: the zoo's GRPOLoss forward + `torch.autograd.grad` run on *meta* tensors under a
  TorchDispatchMode that keeps the bytes of every live tensor storage (an allocator-free count of
  exactly what eager autograd holds: the [N·L, V] logits, their fp32 copies, the softmax grads).
  Compiled: `dsr.compile(..., grad_wrt=...)` at those shapes (compile-only); its plan holds every
  top-level buffer until the call returns, so the peak is the sum of the kernels' output buffers
  (per-token vectors, the gradients, and for bf16 the fp32 gradient accumulators).
* A scale the interpreter runs, N·L = 256, H = 256, V = 8,192 (f32): both measured with the same
  live-storage count on real CPU tensors; for the compiled plan the Triton interpreter's own host
  copies inside a launch are not counted (a GPU launch makes none), the plan's buffers are. The
  model of the compiled peak is checked against this measurement.

"Extra" memory is what a call allocates beyond its inputs: temporaries plus the returned
gradients. DRAM traffic: eager counted per ATen op (input + output bytes, views free, as
`dsrc bench`), compiled from the kernels' modeled bytes in report.json
(codegen/families/vocab_loss.py explains the vocabulary kernels' model).
"""
from __future__ import annotations

import argparse
import os
import sys
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsr_compiler as dsr
from dsr_compiler.bench import CountingMode
from dsr_compiler.grads import eager_loss_and_grads
from dsr_compiler.models import grpo as grpo_mod
from dsr_compiler.models.grpo import GRPOLoss
from dsr_compiler.workloads.loss import GRAD_WRT, GRPO_OPTIONS, grpo_inputs

GiB = 1 << 30


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under the mode that are still alive; keeps the peak.

    Storages are keyed by their StorageImpl (works for meta tensors too), refcounted over the
    Python tensors that share them (views), and released when the last one is collected."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.ignored: set[int] = set()
        self.current = 0
        self.peak = 0

    def ignore(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.ignored.add(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.ignored:
            return
        if key not in self.sizes:
            self.sizes[key] = st.nbytes()
            self.refs[key] = 0
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.refs[key]


@contextmanager
def _no_eager_checks():
    """The zoo checks concrete ids (bool(tensor)), which meta tensors cannot answer."""
    saved = grpo_mod._check_logps_inputs, GRPOLoss._check
    grpo_mod._check_logps_inputs = lambda *a, **k: None
    GRPOLoss._check = lambda *a, **k: None
    try:
        yield
    finally:
        grpo_mod._check_logps_inputs, GRPOLoss._check = saved


def eager_figures(m: GRPOLoss, inputs: tuple) -> tuple[int, int]:
    """(peak extra bytes, DRAM bytes per ATen op) of eager forward + autograd.grad."""
    hid, w = (x.detach().clone().requires_grad_(True) for x in inputs[:2])
    args = (hid, w) + tuple(inputs[2:])
    with _no_eager_checks():
        mode = LiveStorageBytes()
        mode.ignore(args)
        with mode:
            loss = m(*args)
            grads = torch.autograd.grad(loss, (hid, w))
        del loss, grads
        hid2, w2 = (x.detach().clone().requires_grad_(True) for x in inputs[:2])
        with CountingMode() as c:
            loss = m(hid2, w2, *inputs[2:])
            torch.autograd.grad(loss, (hid2, w2))
    return mode.peak, c.c.bytes


def compiled_buffers(cm) -> int:
    """Modeled peak extra bytes of the compiled plan: every top-level buffer it allocates (kernel
    outputs and constants; reshapes are views) is alive until the call returns, plus the largest
    workspace of one launch (bf16 gradient kernels: an fp32 slot per program)."""
    from dsr_compiler.codegen.spec import eval_expr
    env = {k: v for k, v in cm.example_env.items()}
    total = 0
    for k in cm.kernels:
        ws = 0
        for a in k.spec.tensor_args:
            if a.role == "scratch":
                n = 1
                for d in a.shape:
                    n *= eval_expr(d, env)
                ws += n * a.dtype.itemsize
        total = max(total, ws)
    for n in cm.graph.nodes:
        if n.op == "reshape":
            continue
        for o in n.outputs:
            shape = [int(d.subs({s: env[str(s)] for s in d.free_symbols})) if d.free_symbols else int(d)
                     for d in o.type.shape]
            numel = 1
            for d in shape:
                numel *= d
            total += numel * o.type.dtype.itemsize
    return total


def compiled_measured(cm, inputs: tuple) -> int:
    """Peak extra bytes of one interpreted call, the interpreter's own copies inside a launch excluded."""
    be, plan = cm.plan("interpret")
    mode = LiveStorageBytes()
    saved = [(step, step.fn) for step in plan.steps if getattr(step, "fn", None) is not None]
    for step, fn in saved:
        step.fn = _Paused(fn, mode)
    args = [x for x in inputs if x is not None]
    mode.ignore(args + cm._device_params[be])
    try:
        with mode:
            out = cm(*args)
        del out
    finally:
        for step, fn in saved:
            step.fn = fn
    return mode.peak


class _Paused:
    def __init__(self, fn, mode: LiveStorageBytes) -> None:
        self.fn, self.mode = fn, mode

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*a, **k):
            # leave the mode for the launch: the interpreter's own tensors are not the plan's (a GPU
            # launch makes none), and dispatching each of them through Python would be slow
            self.mode.__exit__(None, None, None)
            try:
                return launch(*a, **k)
            finally:
                self.mode.__enter__()
        return run


def compiled_traffic(cm) -> int:
    rep = cm.report()
    return int(sum(k["bytes_read"] + k["bytes_written"] for k in rep["kernels"]))


def figures(n: int, length: int, h: int, v: int, dtype: torch.dtype, run: bool) -> dict:
    m = GRPOLoss(**GRPO_OPTIONS)
    meta = grpo_inputs(n, length, h, v, dtype, 0, device="meta")
    eager_peak, eager_bytes = eager_figures(m, meta)
    cm = dsr.compile(m, meta, grad_wrt=GRAD_WRT, backend="interpret", fp8=False)
    out = {"tokens": n * length, "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""),
           "eager_peak_extra": eager_peak, "compiled_peak_extra_model": compiled_buffers(cm),
           "grads": (n * length * h + v * h) * torch.empty((), dtype=dtype).element_size(),
           "logits_fp32": n * length * v * 4, "eager_dram": eager_bytes, "compiled_dram": compiled_traffic(cm),
           "kernels": len(cm.kernels)}
    if run:
        real = grpo_inputs(n, length, h, v, dtype, 0, GRPO_OPTIONS["temperature"])
        out["eager_peak_extra_measured"], _ = eager_figures(m, real)
        out["compiled_peak_extra_measured"] = compiled_measured(cm, real)
        loss, grads = cm(*real)
        ref_loss, ref_grads = eager_loss_and_grads(m, real, GRAD_WRT)
        out["max_grad_err"] = max(float((grads[k] - ref_grads[k]).abs().max()) for k in GRAD_WRT)
        out["loss_err"] = float((loss - ref_loss).abs())
    return out


def report(f: dict) -> str:
    lines = [f"N·L={f['tokens']:,} H={f['H']:,} V={f['V']:,} {f['dtype']}: {f['kernels']} kernels"]
    ep, cp = f["eager_peak_extra"], f["compiled_peak_extra_model"]
    lines.append(f"  peak extra memory   eager {ep / GiB:9.3f} GiB ({ep / f['logits_fp32']:.2f}x the fp32 [N·L, V] "
                 f"logits)   compiled {cp / GiB:9.3f} GiB   ratio {cp / ep:.4f}")
    tmp_e, tmp_c = ep - f["grads"], cp - f["grads"]
    lines.append(f"  ... less the gradients (temporaries)   eager {tmp_e / GiB:9.3f} GiB   compiled "
                 f"{tmp_c / GiB:9.3f} GiB   ratio {tmp_c / tmp_e:.4f}")
    lines.append(f"  DRAM traffic        eager {f['eager_dram'] / GiB:9.2f} GiB   compiled {f['compiled_dram'] / GiB:9.2f} "
                 f"GiB   ratio {f['compiled_dram'] / f['eager_dram']:.3f}")
    if "compiled_peak_extra_measured" in f:
        lines.append(f"  measured (CPU run)  eager {f['eager_peak_extra_measured'] / 2**20:9.2f} MiB   compiled "
                     f"{f['compiled_peak_extra_measured'] / 2**20:9.2f} MiB (model {cp / 2**20:.2f} MiB)   ratio "
                     f"{f['compiled_peak_extra_measured'] / f['eager_peak_extra_measured']:.4f}; "
                     f"|loss err| {f['loss_err']:.1e}, max |grad err| {f['max_grad_err']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-run", action="store_true", help="do not run the small scale on the interpreter")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print("GRPO loss + backward (hidden, LM head): eager autograd vs compiled (dsr.compile grad_wrt)")
    for dt in (torch.bfloat16, torch.float32):
        print(report(figures(4, 4096, 7168, 129280, dt, run=False)))
    print(report(figures(16, 16, 256, 8192, torch.float32, run=not args.skip_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
