"""`dsrc`: the command line (compile, run, ir, bench, diff, report). See DESIGN §3 and the README.

Exit codes: 0 success, 1 check failed, 2 user error (message, no traceback unless DSR_DEBUG>=1),
3 `dsrc diff --exit-code` found differences.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Sequence

MODULES = ("mlp", "moe", "mla", "decoder", "mtp", "grpo", "model")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse errors are user errors: exit 2, one paragraph
        self.print_usage(sys.stderr)
        sys.stderr.write(f"dsrc: error: {message}\n")
        raise SystemExit(2)


_MAX_COUNT = (1 << 31) - 1


def _count(text: str) -> int:
    """--batch / --seq: a whole number in 1 .. 2**31 - 1 (the kernels index tokens with 32-bit offsets)."""
    try:
        n = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        fits = f.is_integer() and 1 <= f <= _MAX_COUNT
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer" + (
            f" (write {int(f)})" if fits else f"; use a whole number in 1 .. {_MAX_COUNT:,}")) from None
    if not 1 <= n <= _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{n} is outside 1 .. {_MAX_COUNT:,}")
    return n


def _rank(text: str) -> int:
    """--ep-rank: a whole number >= 0 (checked against --ep later)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= n < 1 << 16:
        raise argparse.ArgumentTypeError(f"{n} is outside 0 .. {(1 << 16) - 1}")
    return n


def _ep_options(p: argparse.ArgumentParser, run: bool) -> None:
    g = p.add_argument_group("expert parallelism (README \"Expert parallelism\")")
    g.add_argument("--ep", type=_count, default=None, metavar="N",
                   help=("spread the routed experts over N ranks: starts N local processes (gloo; under torchrun the "
                         "launch's ranks) and checks each rank against one process and eager" if run else
                         "compile one rank's plan of N (with --ep-rank): IR, kernels and the exchanges' sizes"))
    g.add_argument("--ep-mode", default="fixed", choices=("fixed", "exact"),
                   help="fixed: fixed-capacity exchanges, no host sync (default); exact: only the routed rows move, "
                        "one host sync per exchange")
    if not run:
        g.add_argument("--ep-rank", type=_rank, default=0, metavar="R", help="the rank whose plan to build (default 0)")


def _ep_plan(args):
    """EpPlan(--ep, --ep-rank) of `dsrc compile|ir`, or None."""
    if not getattr(args, "ep", None):
        return None
    from dsr_compiler.ep import EpPlan
    return EpPlan(args.ep, args.ep_rank)


def _selectors(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selectors")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="built-in config: deepseek-v3-tiny (default), deepseek-v2-lite, deepseek-v3")
    src.add_argument("--config", default=None, help="path to a DeepSeek config.json (HF or reference ModelArgs format)")
    g.add_argument("--module", default="decoder", choices=MODULES, help="which part of the model to compile (default: decoder)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (they are shown only on a terminal, for work over 2 s)")
    g.add_argument("--batch", type=_count, default=1, help="batch size of the example inputs (default 1)")
    g.add_argument("--seq", type=_count, default=16, help="sequence length of the example inputs (default 16)")
    g.add_argument("--dtype", default="f32", choices=("f32", "bf16"), help="activation/weight dtype (default f32)")
    fp8 = g.add_mutually_exclusive_group()
    fp8.add_argument("--fp8", dest="fp8", action="store_true",
                     help="DeepSeek FP8 block recipe: quant_fp8 + gemm_fp8 for eligible GEMMs (default)")
    fp8.add_argument("--no-fp8", dest="fp8", action="store_false", help="keep GEMMs in the activation dtype")
    p.set_defaults(fp8=True)
    g.add_argument("--fp8-policy", default=None, metavar="JSON",
                   help='FP8 policy fields as JSON, e.g. \'{"scale_fmt": "ue8m0", "attn": false}\' '
                        "(attn, mlp, experts, shared_experts, other, block, scale_fmt, block_m, block_n, force)")
    g.add_argument("--mla", default="absorb", choices=("naive", "absorb"),
                   help="MLA decode form (absorb: attend to the latent cache; naive: expand it through wkv_b)")
    g.add_argument("--phase", default=None, choices=("decode", "prefill"),
                   help="--module mla/decoder/model: one decode step against a --seq-long KV cache (default) "
                        "or causal prefill of --seq tokens")
    g.add_argument("--target", default="sm_90a", choices=("sm_90a",), help="GPU target (default sm_90a)")


def _config(args):
    from dsr_compiler.models import ModelConfig
    if args.config:
        return ModelConfig.from_json(args.config)
    return ModelConfig.named(args.model or "deepseek-v3-tiny")


def _workload(args, seed: int = 0):
    from dsr_compiler.workloads import build
    return build(_config(args), args.module, args.batch, args.seq, args.dtype, seed, phase=args.phase)


def _require_weights(wl, cmd: str) -> None:
    """Workloads too big for host memory are built on the meta device: compile-only."""
    if any(p.is_meta for p in wl.module.parameters()):
        from dsr_compiler.errors import DsrError
        raise DsrError(f"dsrc {cmd} --module {wl.name}: this config's weights are too large to materialize here, "
                       "so the module was built on the meta device (compile-only)",
                       hint=f"use `dsrc compile` for it, or `dsrc {cmd}` with a smaller config (--model deepseek-v3-tiny)")


def _fp8(args):
    """False, True, or the policy dict of --fp8-policy (which implies --fp8; with --no-fp8 it is an error)."""
    from dsr_compiler.errors import DsrError
    if getattr(args, "fp8_policy", None) is not None and not args.fp8:
        raise DsrError("--no-fp8 and --fp8-policy contradict each other: a policy configures FP8, --no-fp8 turns it off",
                       hint="drop --no-fp8 to apply the policy, or drop --fp8-policy to keep GEMMs unquantized")
    if not args.fp8 or not getattr(args, "fp8_policy", None):
        return args.fp8
    from dsr_compiler.models.config import parse_json     # bounded depth, no duplicate keys, no NaN
    pol = parse_json(args.fp8_policy, "--fp8-policy", 'e.g. --fp8-policy \'{"scale_fmt": "ue8m0"}\'')
    if not isinstance(pol, dict):
        raise DsrError("--fp8-policy must be a JSON object of policy fields", hint='e.g. \'{"attn": false}\'')
    return pol


def _options(args):
    """The selectors' compile options, validated as `dsr.compile` validates them (dsr_compiler/options.py)."""
    from dsr_compiler.options import CompileOptions
    return CompileOptions.make(fp8=_fp8(args), target=args.target, backend=getattr(args, "backend", None),
                               mla=args.mla)


def _compile(args, wl, ep=None):
    import dsr_compiler as dsr
    from dsr_compiler.progress import Progress
    progress = Progress.for_cli(quiet=getattr(args, "quiet", False))
    try:
        return dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, name=wl.name,
                           grad_wrt=getattr(wl, "grad_wrt", None) or None, options=_options(args), progress=progress,
                           ep=ep, ep_mode=getattr(args, "ep_mode", "fixed") if ep is not None else "fixed")
    finally:
        progress.done()


def _summary(cm) -> str:
    from dsr_compiler.report import summary
    return summary(cm.report())


def cmd_compile(args) -> int:
    if args.out is not None:        # refuse a folder holding other data before any compile work
        from dsr_compiler.dump import check_out_dir
        check_out_dir(args.out)
    wl = _workload(args)
    cm = _compile(args, wl, _ep_plan(args))
    print(_summary(cm))
    if args.out:
        out = cm.dump(args.out)
        print(f"dump written to {out}/ (ir/, kernels/, report.json)")
    return 0


def _check_fp8_output(label: str, o, ref, sim, pinned, stages: int, routed: bool) -> bool:
    """Print the FP8 comparisons of one output; True when the enforced ones pass (tolerance.py)."""
    from dsr_compiler.tolerance import compare_fp8
    dt = str(ref.dtype).replace("torch.", "")
    rs = compare_fp8(o, sim, "fp8_sim", stages)
    print(f"check {label}vs eager PyTorch running the FP8 recipe (models/fp8_ref.py): max abs err {rs['max_abs']:.3e}, "
          f"calc_diff {rs['calc_diff']:.2e}; fp8_sim tolerance ({stages} quantized stages) max abs "
          f"{rs['atol']:.2e}, calc_diff {rs['calc_diff_max']:.0e}")
    r = compare_fp8(o, pinned, "fp8", stages)
    pin = ", experts pinned to the FP8 path's choice" if routed else ""
    print(f"check {label}vs eager PyTorch ({dt}, no quantization{pin}): max abs err {r['max_abs']:.3e}, calc_diff "
          f"{r['calc_diff']:.2e}; fp8 tolerance max abs {r['atol']:.2e} ({r['atol_frac']:.3g} x max|eager|), "
          f"calc_diff {r['calc_diff_max']:.0e}")
    if routed:
        u = compare_fp8(o, ref, "fp8", stages)
        print(f"  (vs eager with its own routing: max abs err {u['max_abs']:.3e}, calc_diff {u['calc_diff']:.2e} "
              "[reported, not checked: a MoE router reads FP8-perturbed values, see dsr_compiler/tolerance.py])")
    return rs["ok"] and r["ok"]


def cmd_run(args) -> int:
    if args.ep:                             # N ranks: dsr_compiler/ep_run.py launches or runs one of them
        from types import SimpleNamespace

        from dsr_compiler.ep_run import run_ep
        return run_ep(args, SimpleNamespace(workload=_workload, require_weights=_require_weights, compile=_compile,
                                            run_and_check=run_and_check))
    wl = _workload(args, seed=args.seed)
    _require_weights(wl, "run")
    cm = _compile(args, wl)
    return run_and_check(args, wl, cm, wl.make_inputs(args.batch * args.seq, args.seed))


def run_and_check(args, wl, cm, inputs) -> int:
    """Run `cm` on `inputs`, print what ran and, with --check, the comparisons with eager; 0, or CheckFailed."""
    import torch
    from dsr_compiler.errors import CheckFailed
    from dsr_compiler.tolerance import compare
    be, _ = cm.plan(args.backend)
    dev = "cuda" if be == "cuda" else "cpu"
    out = cm(*[x.to(dev) for x in inputs], backend=be)
    if args.check:
        cm.check()                          # kernels' runtime flags (e.g. a position outside the cache)
    if getattr(wl, "grad_wrt", None):       # a loss with gradients: dsr_compiler/grads.py checks both
        from dsr_compiler.grads import run_check
        return run_check(cm, wl, inputs, out, be, args.check)
    outs = out if isinstance(out, tuple) else (out,)     # decode steps also return the updated caches
    shown = ", ".join(f"{tuple(o.shape)} {str(o.dtype).replace('torch.', '')}" for o in outs)
    print(f"ran {len(cm.kernels)} kernels on backend {be}; output{'s' if len(outs) > 1 else ''} {shown}")
    if not args.check:
        return 0
    with torch.no_grad():
        ref = wl.module(*inputs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    ok = True
    if cm.options.get("fp8"):
        # "fp8_sim" reference: the zoo's own eager modules with their FP8-eligible linears running the
        # recipe in plain torch (models/fp8_ref.py), independent of the trace and the op table. Where a
        # MoE router reads FP8 values, the unquantized reference takes the FP8 path's expert choices.
        from dsr_compiler.ir.passes.quantize_fp8 import Fp8Policy, fp8_stages
        from dsr_compiler.models.fp8_ref import fp8_reference, pinned_routing
        stages, routed = fp8_stages(cm.graph)
        sim_module = fp8_reference(wl.module, Fp8Policy.from_option(cm.options["fp8"]), mla=args.mla)
        pin_module, unhook = pinned_routing(wl.module, sim_module) if routed else (None, lambda: None)
        with torch.no_grad():
            sims, pins = sim_module(*inputs), (pin_module(*inputs) if routed else refs)
        unhook()
        sims, pins = (sims if isinstance(sims, tuple) else (sims,)), (pins if isinstance(pins, tuple) else (pins,))
    for i, (o, ref) in enumerate(zip(outs, refs)):
        label = f"output {i} (%{cm.graph.outputs[i]}) " if len(outs) > 1 else ""
        if cm.options.get("fp8"):
            ok = _check_fp8_output(label, o.cpu(), ref, sims[i], pins[i], stages, routed) and ok
            continue
        else:
            r = compare(o.cpu(), ref)
            print(f"check {label}vs eager PyTorch: max abs err {r['max_abs']:.3e}, max rel err {r['max_rel']:.3e}; "
                  f"tolerance atol {r['atol']:.1e} rtol {r['rtol']:.1e} ({str(ref.dtype).replace('torch.', '')})")
        ok = ok and r["ok"]
    if not ok:
        raise CheckFailed("check failed: compiled output differs from eager beyond tolerance",
                          where=f"--module {args.module}", hint="DSR_DEBUG=4 shows the generated kernels")
    print("check passed")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from dsr_compiler.diff import DiffError
    from dsr_compiler.dump import MARKER, is_dump
    from dsr_compiler.report_html import render_dump_html
    folder = Path(args.dir)
    if not is_dump(folder):
        raise DiffError(f"{folder} is not a dsr dump (no {MARKER} marker)",
                        hint="pass a folder written by `dsrc compile --out DIR` or `cm.dump(DIR)`")
    page = render_dump_html(folder)
    dest = Path(args.html) if args.html else folder / "report.html"
    _write_page(dest, page)
    print(f"{dest}: {len(page.encode()):,} bytes")
    return 0


def _write_page(dest, page: str) -> None:
    """Write an HTML page whole or not at all; a folder or symlink at `dest` is refused."""
    import tempfile

    from dsr_compiler.diff import DiffError
    if dest.is_dir() or dest.is_symlink():
        raise DiffError(f"--html {dest} is a folder or a symlink", hint="name a new file or a regular file")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_diff(args) -> int:
    from dsr_compiler.diff import diff_dumps
    d = diff_dumps(args.a, args.b)
    if args.html:
        from pathlib import Path
        _write_page(Path(args.html), d.html())
    sys.stdout.write(d.text())
    return 3 if args.exit_code and not d.same else 0


def cmd_ir(args) -> int:
    from dsr_compiler.ir.passes import PIPELINE
    from dsr_compiler.ir.printer import header_line, print_graph
    import dsr_compiler as dsr
    from dsr_compiler import ep as ep_mod
    info = ep_mod.resolve(_ep_plan(args), getattr(args, "ep_mode", "fixed"))
    pipeline = ep_mod.pipeline(list(PIPELINE), info)
    names = ["trace"] + [n for n, _ in pipeline]
    if args.after and args.after not in names:
        from dsr_compiler.errors import DsrError
        raise DsrError(f"unknown pass {args.after!r} for --after", hint=f"passes: {', '.join(names)}")
    wl = _workload(args)
    options = _options(args)                # the same checks as `dsrc compile` / dsr.compile
    from dsr_compiler.ir.passes import PassContext, run_passes
    g = dsr.trace(wl.module, wl.example_inputs, dynamic=wl.dynamic, name=wl.name)
    grad_wrt = tuple(getattr(wl, "grad_wrt", None) or ())
    popts = options.pass_options(grad_wrt)
    if info is not None:
        popts["ep"] = info.pass_option()
    records = run_passes(g, pipeline, PassContext(options=popts))
    total = len(records) - 1
    if args.dot:
        from dsr_compiler.ir.dot import to_dot
        r = next(r for r in records if r.name == args.after) if args.after else records[-1]
        sys.stdout.write(to_dot(r.graph))
        return 0
    for r in records:
        if args.after is None or r.name == args.after:
            sys.stdout.write(print_graph(r.graph, header_line(r.graph, r.index, total, r.name, r.ms)))
            if args.after is None and r is not records[-1]:
                sys.stdout.write("\n")
    return 0


def cmd_bench(args) -> int:
    from dsr_compiler.bench import bench_workload
    wl = _workload(args)
    _require_weights(wl, "bench")
    from dsr_compiler.progress import Progress
    progress = Progress.for_cli(quiet=getattr(args, "quiet", False))
    try:
        text = bench_workload(wl, fp8=args.fp8, target=args.target, progress=progress)
    finally:
        progress.done()
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dsrc", description="dsr_compiler: compile DeepSeek-style PyTorch modules to Triton/PTX for sm_90a")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="trace, optimize, generate and compile; write the dump with --out")
    _selectors(c)
    _ep_options(c, run=False)
    c.add_argument("--out", default=None, help="dump folder: ir/, kernels/, report.json")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("run", help="compile and run on seeded random inputs; --check compares with eager")
    _selectors(r)
    r.add_argument("--backend", default=None, choices=("auto", "cuda", "interpret"),
                   help="runtime backend (default: the DSR_BACKEND knob, itself auto by default)")
    r.add_argument("--check", action="store_true", help="compare with eager PyTorch; exit 1 beyond tolerance")
    r.add_argument("--seed", type=int, default=0)
    _ep_options(r, run=True)
    r.set_defaults(fn=cmd_run)
    i = sub.add_parser("ir", help="print the IR after each pass (or after --after PASS)")
    _selectors(i)
    i.add_argument("--after", default=None, help="pass name (trace, cse, fold_constants, dce, absorb_mla, quantize_fp8, "
                                                 "[expert_parallel with --ep,] fuse)")
    _ep_options(i, run=False)
    i.add_argument("--dot", action="store_true",
                   help="print the graph after --after (default: the last pass) in Graphviz dot instead of text")
    i.set_defaults(fn=cmd_ir)
    b = sub.add_parser("bench", help="kernel launches and modeled DRAM bytes vs eager, compile times")
    _selectors(b)
    b.set_defaults(fn=cmd_bench)
    rp = sub.add_parser("report", help="re-render DIR/report.html from a dump (or write it to --html FILE)")
    rp.add_argument("dir", metavar="DIR", help="a dump folder (dsrc compile --out DIR)")
    rp.add_argument("--html", default=None, help="write the page here instead of DIR/report.html")
    rp.set_defaults(fn=cmd_report)
    d = sub.add_parser("diff", help="what changed between two dumps: options, passes and IR, kernels, totals")
    d.add_argument("a", metavar="DIR_A", help="a dump folder (dsrc compile --out DIR_A)")
    d.add_argument("b", metavar="DIR_B", help="another dump folder")
    d.add_argument("--exit-code", action="store_true", help="exit 3 if the dumps differ (0 if they do not)")
    d.add_argument("--html", default=None, metavar="FILE", help="also write the differences as a page to FILE")
    d.set_defaults(fn=cmd_diff)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dsr_compiler.interrupts import watch_interrupts   # light: torch is imported inside the guard below
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # what `dsrc run --ep N` starts its ranks with
    try:
        with warnings.catch_warnings(), watch_interrupts():
            warnings.showwarning = _show_warning
            return _run(args)
    except KeyboardInterrupt:       # Ctrl-C: nothing half-written is left behind (dump and cache write atomically)
        sys.stderr.write(f"dsrc {args.cmd}: interrupted\n")
        return 130


def _run(args) -> int:
    from dsr_compiler.errors import DsrError   # the first heavy import (torch, sympy): seconds
    try:
        from dsr_compiler import knobs
        knobs.triton_defaults()
        knobs.check_all()
        return args.fn(args)
    except DsrError as e:
        _debug_traceback()
        sys.stderr.write(f"dsrc {args.cmd}: {e}\n")
        return e.exit_code
    except BrokenPipeError:         # `dsrc ir | head`: the reader left early, nothing went wrong here
        _silence_stdout()
        return 141                  # what a shell reports for a writer stopped by SIGPIPE
    except OSError as e:            # the environment (disk full, permissions, read-only): not a failed check
        _debug_traceback()
        sys.stderr.write(f"dsrc {args.cmd}: {_os_error(e)}\n")
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail on the pipe again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):   # no real file descriptor (captured output)
        pass


def _debug_traceback() -> None:
    """The traceback behind an error, under DSR_DEBUG>=1 (a malformed DSR_DEBUG shows none: it is the
    error being reported)."""
    from dsr_compiler import knobs
    from dsr_compiler.errors import DsrError
    try:
        show = knobs.get("DSR_DEBUG") >= 1
    except DsrError:
        show = False
    if show:
        traceback.print_exc()


def _os_error(e: OSError) -> str:
    """what / where / hint for an OSError that escaped a command."""
    where = f"\n  where: {e.filename}" if e.filename else ""
    return (f"{e.strerror or e}{where}\n  hint: check that the files and folders named exist, are "
            "readable / writable and that the disk is not full (DSR_DEBUG=1 shows the traceback)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings of the compiler (e.g. runtime.cache.CacheWarning) as one `dsrc: warning:` line."""
    from dsr_compiler.runtime.cache import CacheWarning
    if issubclass(category, CacheWarning):
        sys.stderr.write(f"dsrc: warning: {message}\n")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    sys.exit(main())
