"""Frontend lowerings: torch ops, torch.nn modules and the zoo's leaves into IR ops.

Where it sits: imported once by `frontend/tracer.py`; each module registers its handlers into
`frontend/registry.py` at import and uses `frontend/context.py`'s TraceContext to emit IR. They
import the registry and the context, never the other way round. Every module is listed here,
once: a torch target, op or key registered twice raises at import, so the order carries no
meaning (it is only the order in which the tables are filled).
"""
from . import alloc, arith, hf_masks, loss, mla, moe, moe_patterns, nn, reduce, select, shape

#: every lowering module (what each registers is listed in its docstring)
MODULES = (arith, reduce, shape, alloc, select, nn, moe, moe_patterns, hf_masks, mla, loss)

__all__ = ["MODULES"]
