"""dsr_compiler.ir: the typed IR (types, op table, graph, printer, parser, verifier, interpreter)."""
from .graph import Graph, GraphBuilder, Kernel, Node, Value
from .interp import run_graph
from .ops import OPS, OpDef, get_op
from .parser import parse
from .printer import print_graph
from .types import DType, TensorType, parse_type, sym
from .verifier import verify

__all__ = ["DType", "Graph", "GraphBuilder", "Kernel", "Node", "OPS", "OpDef", "TensorType", "Value",
           "get_op", "parse", "parse_type", "print_graph", "run_graph", "sym", "verify"]
