"""The IR graph: frozen values, nodes, fused kernels, and ordered SSA graphs.

Passes never mutate a graph; they build a new one (see `GraphBuilder`). Node attributes
are plain printable values (int, float, str, bool, None, DType, sympy dims, tuples of
those), canonicalized on construction so that printing and parsing round-trip exactly.
The text form (`print_graph`, `format_node`, ...) is here too, so `str(graph)` is the IR text;
ir/printer.py describes the format and re-exports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import sympy

from .types import DType, TensorType, dim_str


def canon_attr(v: Any) -> Any:
    """Canonical attribute value: sympy integers become ints, lists become tuples."""
    if isinstance(v, bool) or v is None or isinstance(v, (str, float, DType)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, sympy.Expr):
        return int(v) if v.is_Integer else v
    if isinstance(v, (list, tuple)):
        return tuple(canon_attr(x) for x in v)
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} is not printable IR")


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name} : {self.type}"


@dataclass(frozen=True, slots=True)
class Node:
    outputs: tuple[Value, ...]
    op: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    origin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        attrs = self.attrs.items() if isinstance(self.attrs, Mapping) else self.attrs
        object.__setattr__(self, "attrs", tuple((str(k), canon_attr(v)) for k, v in attrs))

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def out(self) -> Value:
        """The single output (most ops have one)."""
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def replace(self, **kw: Any) -> "Node":
        d = dict(outputs=self.outputs, op=self.op, inputs=self.inputs, attrs=self.attrs, origin=self.origin)
        d.update(kw)
        return Node(**d)


@dataclass(frozen=True, slots=True)
class Kernel:
    """A fused region: a named sub-graph lowered to one generated kernel."""

    name: str
    family: str
    body: "Graph"
    attrs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        attrs = self.attrs.items() if isinstance(self.attrs, Mapping) else self.attrs
        object.__setattr__(self, "attrs", tuple((str(k), canon_attr(v)) for k, v in attrs))

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True, slots=True)
class Graph:
    name: str
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...] = ()          # names among `inputs` that are module parameters
    kernels: tuple[Kernel, ...] = ()

    def __post_init__(self) -> None:
        for f in ("inputs", "nodes", "outputs", "params", "kernels"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    # --- lookups (cheap enough for the graph sizes we handle; passes cache if needed)
    def values(self) -> dict[str, Value]:
        vals = {v.name: v for v in self.inputs}
        for n in self.nodes:
            for o in n.outputs:
                vals[o.name] = o
        return vals

    def producers(self) -> dict[str, Node]:
        return {o.name: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        u: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                u.setdefault(i, []).append(n)
        return u

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    @property
    def data_inputs(self) -> tuple[Value, ...]:
        ps = set(self.params)
        return tuple(v for v in self.inputs if v.name not in ps)

    @property
    def param_inputs(self) -> tuple[Value, ...]:
        ps = set(self.params)
        return tuple(v for v in self.inputs if v.name in ps)

    def output_values(self) -> tuple[Value, ...]:
        vals = self.values()
        return tuple(vals[o] for o in self.outputs)

    def replace(self, **kw: Any) -> "Graph":
        d = dict(name=self.name, inputs=self.inputs, nodes=self.nodes, outputs=self.outputs,
                 params=self.params, kernels=self.kernels)
        d.update(kw)
        return Graph(**d)

    def __str__(self) -> str:
        return print_graph(self)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def to_networkx(self):
        """A networkx DiGraph of value flow (for analysis and dot export, not storage)."""
        import networkx as nx
        g = nx.DiGraph()
        prod = self.producers()
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op, label=f"{n.op}:{n.outputs[0].name if n.outputs else ''}")
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            for inp in n.inputs:
                if inp in prod:
                    g.add_edge(index[id(prod[inp])], i, value=inp)
        return g


# ----------------------------------------------------------------------------- text form
# The printer's core lives with the data it prints, so `str(graph)` needs no upward import;
# ir/printer.py documents the format, adds the header line and re-exports these.

def float_repr(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def format_attr(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return float_repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, DType):
        return v.value
    if isinstance(v, sympy.Expr):
        return dim_str(v)
    if isinstance(v, tuple):
        inner = ", ".join(format_attr(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise TypeError(f"cannot print attribute {v!r}")


def format_node(n: Node) -> str:
    lhs = ", ".join(f"%{o.name}" for o in n.outputs)
    types = ", ".join(str(o.type) for o in n.outputs)
    args = [f"%{i}" for i in n.inputs]
    attrs = list(n.attrs)
    if n.op == "call":
        kname = dict(attrs)["kernel"]
        rest = [f"{k}={format_attr(v)}" for k, v in attrs if k != "kernel"]
        rhs = f"call @{kname}({', '.join(args + rest)})"
    else:
        rhs = f"{n.op}({', '.join(args + [f'{k}={format_attr(v)}' for k, v in attrs])})"
    line = f"{lhs} : {types} = {rhs}" if n.outputs else rhs
    if n.origin:
        line += f"  # {n.origin}"
    return line


def _signature(g: Graph) -> str:
    ps = set(g.params)
    parts = [("param " if v.name in ps else "") + f"%{v.name} : {v.type}" for v in g.inputs]
    return ", ".join(parts)


def _body(g: Graph, indent: str = "  ") -> list[str]:
    lines = [indent + format_node(n) for n in g.nodes]
    lines.append(indent + "return " + ", ".join(f"%{o}" for o in g.outputs))
    return lines


def format_kernel(k: Kernel) -> list[str]:
    attrs = [f'family={format_attr(k.family)}'] + [f"{a}={format_attr(v)}" for a, v in k.attrs]
    lines = [f"kernel @{k.name}({_signature(k.body)}) {' '.join(attrs)} {{"]
    lines += _body(k.body)
    lines.append("}")
    return lines


def print_graph(g: Graph, header: str | None = None) -> str:
    lines: list[str] = []
    if header is not None:
        lines.append(header)
    for k in g.kernels:
        lines += format_kernel(k)
        lines.append("")
    lines.append(f"graph {g.name}({_signature(g)}) {{")
    lines += _body(g)
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass
class GraphBuilder:
    """Mutable helper that passes use to build a new frozen Graph."""

    name: str
    inputs: list[Value] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    kernels: list[Kernel] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _counter: int = 0

    def fresh(self, hint: str = "v") -> str:
        base = hint or "v"
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}.{self._counter}"
        self._names.add(name)
        return name

    def reserve(self, names: Iterable[str]) -> None:
        self._names.update(names)

    def add_input(self, name: str, type: TensorType, param: bool = False) -> Value:
        v = Value(name, type)
        self._names.add(name)
        self.inputs.append(v)
        if param:
            self.params.append(name)
        return v

    def add(self, node: Node) -> Node:
        for o in node.outputs:
            self._names.add(o.name)
        self.nodes.append(node)
        return node

    def build(self, outputs: Iterable[str]) -> Graph:
        return Graph(self.name, tuple(self.inputs), tuple(self.nodes), tuple(outputs),
                     tuple(self.params), tuple(self.kernels))
