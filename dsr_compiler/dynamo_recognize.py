"""`torch.compile(backend="dsr")`: modules of other libraries recognised inside a TorchDynamo graph.

Dynamo inlines every module's forward, so the graph the backend receives has no module calls left: a
transformers MoE router is `linear`, `sigmoid`, three `topk`s, `scatter_`, ...; its stacked experts are
`sort`, `histc`, `cumsum`, `_grouped_mm` (or `repeat_interleave` + `bmm`). Each node still carries the
module it came from (`nn_module_stack`: {str(id(module)): (source path, class)}), so this pass cuts the
nodes of one module call back out and puts a single call of that module in their place; the trace then
meets the module and lowers it through its recognizer (frontend/lowerings/moe_patterns.py) exactly as
`dsr.compile` does: router, dispatch, grouped GEMMs, combine.

The module objects come from the frame Dynamo is compiling (its locals and globals, walked with
`named_modules`, at most MAX_MODULES): the stack keys are compared with `id()` of modules reached that way,
never turned back into objects. Dynamo exposes that frame only through its translator
(`InstructionTranslator.current_tx()`, a private hook): where it is missing, nothing is recognised and the
graph is traced op by op as before.

A module call is cut out only when it is whole in this graph and its boundary is unambiguous: the values
it reads from outside (other than its own parameters) and the values read after it match the
recognizer's roles (`Recognizer.io`: float / integer, last dim) one to one, all its reads come before the
first use of its results, it writes into nothing it did not create, and, called on its own on the values
its arguments have when the graph runs on the example inputs, it gives the values its results have there
(a misread boundary cannot pass silently). Otherwise the graph is left as it is and the reason becomes a
note added to the error the trace then meets (the usual case: transformers' `eager` experts loop, which
Dynamo splits at `nonzero` into several graphs).
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import fx, nn

MAX_MODULES = 200_000           # modules walked from the frame's locals and globals


def frame_modules() -> tuple[dict[int, nn.Module], nn.Module | None]:
    """id -> module for every module the compiled frame reaches by a name (locals, globals) and below; and
    the frame's `self` when it is a module (a forward that Dynamo compiles as a frame of its own)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        scopes = [dict(tx.f_locals), dict(tx.f_globals)]
    except Exception:                       # noqa: BLE001  (another torch: no frame, nothing recognised)
        return {}, None
    me = scopes[0].get("self")
    return _walk(scopes), (me if isinstance(me, nn.Module) else None)


def _walk(scopes: list[dict]) -> dict[int, nn.Module]:
    out: dict[int, nn.Module] = {}
    for scope in scopes:
        for v in scope.values():
            if not isinstance(v, nn.Module) or id(v) in out:
                continue
            for _, m in v.named_modules():
                out[id(m)] = m
                if len(out) >= MAX_MODULES:
                    return out
    return out


def _stack(n: fx.Node) -> dict:
    return n.meta.get("nn_module_stack") or {}


def _meta_tensor(n: fx.Node) -> torch.Tensor | None:
    v = n.meta.get("example_value")
    return v if isinstance(v, torch.Tensor) else None


def _assign(values: Sequence[fx.Node], roles: list[tuple[bool, int | None]]) -> list[int] | str:
    """For each value, the index of the role it plays (float-ness and last dim; a role with a fixed last dim
    is preferred to one without); a str saying why when that is not one to one."""
    out: list[int] = []
    for v in values:
        t = _meta_tensor(v)
        if t is None:
            return f"`{v.name}` is not a tensor"
        fits = [i for i, (fl, last) in enumerate(roles)
                if fl == t.dtype.is_floating_point and (last is None or (t.dim() > 0 and t.shape[-1] == last))]
        exact = [i for i in fits if roles[i][1] is not None]
        pick = exact if len(exact) == 1 else fits
        if len(pick) != 1:
            return f"`{v.name}` ({t.dtype}, {tuple(t.shape)}) fits {len(pick)} of its roles"
        out.append(pick[0])
    if len(set(out)) != len(out):
        return "two values fit one role"
    return out


def _writes_outside(n: fx.Node, inside: set[fx.Node]) -> bool:
    """An in-place call (`x.add_`, `x[i] = v`, `index_add_`) whose target tensor was not made inside."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    inplace = n.target is operator.setitem or (name.endswith("_") and not name.endswith("__")) \
        or name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "or", "and")
    first = n.args[0] if n.args else None
    return bool(inplace) and isinstance(first, fx.Node) and first not in inside


class _Values:
    """The values of the nodes in `keep` when `gm` runs eagerly on the example inputs (SymInts at their hints),
    computed once on first use: what a cut is checked against. Only those are held (the graph's other
    intermediates are freed as the run goes), so the check costs one eager run, not the graph's memory."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], keep: set[fx.Node]) -> None:
        self.gm, self.inputs, self.keep, self._env = gm, example_inputs, keep, None
        self.failed = "the example sizes have no concrete values to check the cut on"
        self._tried = False

    def env(self) -> dict | None:
        if self._env is None and not self._tried:
            self._tried = True
            args = []
            for a in self.inputs:
                if isinstance(a, torch.SymInt):
                    hint = getattr(a.node, "hint", None)
                    if hint is None:
                        return None
                    a = int(hint)
                args.append(a)
            run = _Keeping(self.gm, self.keep)
            try:
                with torch.no_grad():
                    run.run(*args)
            except Exception as e:                  # noqa: BLE001  (the user's graph failed eagerly: no cut)
                first = (str(e).splitlines() or [""])[0]
                self.failed = f"the graph failed to run eagerly on the example inputs ({type(e).__name__}: {first})"
                return None
            self._env = run.saved
        return self._env


class _Keeping(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep, self.saved = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if n in self.keep:
            self.saved[n] = v
        return v


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6, equal_nan=True))


def _check_call(values: _Values, m: nn.Module, args: list, results: list, roles: list[int], n_out: int) -> str | None:
    """The module called on the values its arguments had inline must give the values its results had."""
    env = values.env()
    if env is None:
        return values.failed
    try:
        with torch.no_grad():
            out = m(*[env[a] for a in args])
    except Exception as e:                          # noqa: BLE001  (its own forward failed: no cut)
        return f"called on its own it failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    outs = (out,) if n_out == 1 else tuple(out) if isinstance(out, (tuple, list)) else ()
    if len(outs) != n_out:
        return f"called on its own it returns {type(out).__name__}, not {n_out} tensors"
    for r, i in zip(results, roles):
        if not _same(outs[i], env[r]):
            return f"called on its own, its result {i} differs from the inlined `{r.name}` (the boundary was misread)"
    return None


def _cut(gm: fx.GraphModule, example_inputs: Sequence[Any], key: str, m: nn.Module, io: tuple[list, list],
         attr: str, values: _Values | None = None) -> str | None:
    """Replace the nodes of module `m`'s call (stack key `key`) by `call_module(attr)`; None, or why not."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    body = [n for n in nodes if n.op.startswith("call") and key in _stack(n)]
    inside = set(body)
    own = {id(t) for t in list(m.parameters()) + list(m.buffers())}
    placeholders = {n: i for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
    reads: list[fx.Node] = []
    for n in body:
        if _writes_outside(n, inside):
            return f"it writes into `{n.args[0]}`, made outside it"
        for a in n.all_input_nodes:
            if a in inside or a in reads:
                continue
            if a.op == "placeholder":
                ex = example_inputs[placeholders[a]]
                if not isinstance(ex, torch.Tensor) or id(ex) in own:
                    continue                # its own parameter, or a size
            elif a.op == "get_attr":
                try:
                    if id(gm.get_parameter(str(a.target))) in own:
                        continue
                except AttributeError:
                    try:
                        if id(gm.get_buffer(str(a.target))) in own:
                            continue
                    except AttributeError:
                        pass
            elif _meta_tensor(a) is None:
                continue                    # a size computed outside
            reads.append(a)
    results = [n for n in body if any(u not in inside for u in n.users)]
    in_roles, out_roles = io
    if len(reads) != len(in_roles):
        return (f"this graph holds {len(reads)} of its {len(in_roles)} tensor arguments: a graph break splits it "
                "(transformers' `eager` experts loop breaks at `nonzero`: set `config._experts_implementation` "
                "to \"grouped_mm\", its default for models, or \"batched_mm\"; or compile with dsr.compile, "
                "which takes the module whole), or it is called more than once")
    if not results or len(results) > len(out_roles):
        return f"{len(results)} of its values are read after it, expected 1 to {len(out_roles)}"
    arg_roles = _assign(reads, in_roles)
    if isinstance(arg_roles, str):
        return f"its arguments are ambiguous: {arg_roles}"
    res_roles = _assign(results, out_roles)
    if isinstance(res_roles, str):
        return f"its results are ambiguous: {res_roles}"
    first_use = min(order[u] for r in results for u in r.users if u not in inside)
    if any(order[a] >= first_use for a in reads):
        return "an argument is computed after its results are used"
    args: list[fx.Node | None] = [None] * len(in_roles)
    for a, i in zip(reads, arg_roles):
        args[i] = a
    if values is not None:
        why = _check_call(values, m, args, results, res_roles, len(out_roles))
        if why is not None:
            return why
    depth = list(_stack(body[0])).index(key) + 1
    stack = dict(list(_stack(body[0]).items())[:depth])
    gm.add_submodule(attr, m)
    with gm.graph.inserting_before(nodes[first_use]):
        call = gm.graph.call_module(attr, tuple(args))
        call.meta.update(nn_module_stack=stack, stack_trace=body[0].meta.get("stack_trace"))
        for r, i in zip(results, res_roles):
            new = call
            if len(out_roles) > 1:
                new = gm.graph.call_function(operator.getitem, (call, i))
                new.meta.update(nn_module_stack=stack, stack_trace=body[0].meta.get("stack_trace"))
            if "example_value" in r.meta:        # what later cuts read roles from
                new.meta["example_value"] = r.meta["example_value"]
            if values is not None and values._env is not None and r in values._env:
                values._env[new] = values._env[r]  # and check against
            r.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
    for n in reversed(body):
        gm.graph.erase_node(n)
    return None


def recognize_in_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str]:
    """Cut each recognised module call of `gm` back to one call (outermost modules first); the notes say
    which modules had a pattern's structure and were not cut, and why."""
    from dsr_compiler.frontend.origins import class_name
    from dsr_compiler.frontend.registry import RECOGNIZERS, verdict_key
    first: dict[str, tuple[int, str]] = {}
    for n in gm.graph.nodes:
        if n.op.startswith("call"):
            for depth, (k, (qual, _)) in enumerate(_stack(n).items()):
                first.setdefault(k, (depth, str(qual)))
    if not RECOGNIZERS:
        return []
    modules, me = frame_modules()
    notes: list[str] = []
    if me is not None:          # Dynamo compiles this module's forward (or a piece of it) as its own frame
        for rec in RECOGNIZERS.values():
            verdict = rec.match(me)
            if verdict is not None and not isinstance(verdict, str):
                notes.append(f"{rec.kind} {class_name(type(me))} is compiled by Dynamo as a frame of its own (a "
                             "graph break around or inside its forward: a data-dependent loop over experts, e.g. "
                             "transformers' `eager` experts at `nonzero`), so it is traced op by op: compile it with "
                             "dsr.compile, which takes it whole (transformers' experts: set "
                             "`config._experts_implementation` to \"grouped_mm\" or \"batched_mm\")")
                break
    matched: list[tuple[str, str, nn.Module, Any, Any]] = []     # (key, where, module, recognizer, spec)
    verdicts: dict[Any, list] = {}                               # verdict_key -> [(recognizer, verdict)]
    for key, (_, qual) in sorted(first.items(), key=lambda kv: kv[1][0]):
        m = modules.get(int(key)) if key.isdigit() else None
        if m is None:
            continue                        # not reached from the frame
        vk = verdict_key(m)
        if vk not in verdicts:              # one probe per kind of module, not per layer
            verdicts[vk] = [(rec, rec.match(m)) for rec in RECOGNIZERS.values()]
        for rec, verdict in verdicts[vk]:
            if verdict is None:
                continue
            where = f"`{qual}` ({class_name(type(m))})"
            if isinstance(verdict, str):
                notes.append(f"{rec.kind} {where} not recognised: {verdict}")
            elif rec.io is None:
                notes.append(f"{rec.kind} {where} is not recognised under torch.compile")
            else:
                matched.append((key, where, m, rec, verdict))
            break
    keys = {k for k, *_ in matched}
    body = {n for n in gm.graph.nodes if n.op.startswith("call") and keys & set(_stack(n))}
    values = _Values(gm, example_inputs, body | {a for n in body for a in n.all_input_nodes})
    count = 0
    for key, where, m, rec, verdict in matched:
        if not any(key in _stack(n) for n in gm.graph.nodes):
            continue                        # inside a module already cut
        why = _cut(gm, example_inputs, key, m, rec.io(m, verdict), f"_dsr_recognized{count}", values)
        if why is None:
            count += 1
        else:
            notes.append(f"{rec.kind} {where} was inlined by Dynamo and cannot be cut back to one call: {why}")
    if count:
        gm.graph.lint()
        gm.recompile()
    return notes
