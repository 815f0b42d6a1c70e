"""Frontend: source locations and names in trace errors and IR origins.

Where it sits: the leaf of `dsr_compiler.frontend` (imports only torch). `context.TraceContext`
uses it to say where a node came from (`file:line in fn: code`, the innermost frame of the
user's code, never torch's or the frontend's own), and `tracer` to place trace-time `print()`s.
"""
from __future__ import annotations

import functools
import linecache
import os
import re
import sys
import traceback
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

#: the user's module inside the generated root wrapper (module paths are reported without it)
ROOT_ATTR = "_dsr_root"
_ROOT_FILE = "<dsr_compiler.frontend root>"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
#: FX node meta key of the user frame `user_frame` recorded at trace time
USER_FRAME = "dsr_user_frame"
#: the frontend's own sources: their frames are never the user's code
FRONTEND_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def fn_name(fn: Any) -> str:
    """How messages name a call target: `Tensor.view`, `torch.add`, `torch.nn.functional.silu`."""
    if isinstance(fn, str):
        return f"Tensor.{fn}"
    try:
        name = fx.node._get_qualified_name(fn)
    except Exception:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    for old, new in (("_operator.", "operator."), ("torch._C._nn.", "torch.nn.functional."),
                     ("torch._C._VariableFunctions.", "torch."), ("builtins.", "")):
        if name.startswith(old):
            name = new + name[len(old):]
    return name



def class_name(cls: Any) -> str:
    """How messages name a module class: `torch.nn.Linear` for torch's own, the bare name otherwise."""
    if not isinstance(cls, type):
        return str(cls)
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return cls.__name__


@functools.lru_cache(maxsize=4096)
def is_user_file(path: str) -> bool:
    """Whether a frame's file is the user's code (not torch, the frontend, or generated code)."""
    if path == _ROOT_FILE or path.startswith("<"):
        return False
    full = os.path.abspath(path)
    return not (full.startswith(_TORCH_DIR) or full.startswith(FRONTEND_DIR))


#: how many frames `user_frame` walks out at most (a trace is a few dozen deep; bounded all the same)
_MAX_FRAMES = 512


def user_frame() -> tuple[str, int, str] | None:
    """(file, line, function) of the innermost frame of the user's code on the live stack, or None.

    What FX's `record_stack_traces` would store, without formatting the whole stack per node (FX
    symbolizes it through `torch._inductor`, an import of ~1.5 s and a cost per node)."""
    f = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if f is None:
            return None
        code = f.f_code
        if is_user_file(code.co_filename):
            return code.co_filename, f.f_lineno, code.co_name
        f = f.f_back
    return None


#: the TorchDynamo graph node being run while the `dsr` backend traces its graph (dynamo.py sets it): our
#: nodes then point at the user's line and module behind it, not at the generated graph code
DYNAMO_NODE: list[Any] = [None]
#: FX node meta key of (module path, class name) taken from the Dynamo node's nn_module_stack
DYNAMO_MODULE = "dsr_dynamo_module"
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def dynamo_origin(n: fx.Node) -> tuple[tuple[str, int, str] | None, tuple[str, str] | None]:
    """(user frame, (module path, class)) of a Dynamo graph node, from its `stack_trace` and `nn_module_stack`."""
    frames = _FRAME.findall(n.meta.get("stack_trace") or "")
    user = [(p, int(line), fn) for p, line, fn in frames if is_user_file(p)]
    frame = user[-1] if user else None
    mod = None
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        qual, cls = list(stack.values())[-1]
        path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", str(qual))
        path = path.removeprefix("L.self").removeprefix("L").lstrip(".")
        mod = (path, class_name(cls) if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].rstrip("'>"))
    return frame, mod


def location_from_user_frame(frame: tuple[str, int, str] | None) -> str:
    """`file:line in fn: code` for what `user_frame` recorded (the code line read only now, for a message)."""
    if frame is None:
        return ""
    path, line, fn = frame
    code = linecache.getline(path, line).strip()
    return f"{short_path(path)}:{line} in {fn}: `{code}`"


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def location_from_frames(frames: Sequence[traceback.FrameSummary]) -> str:
    """The same, from a live Python stack or a traceback (no FX node at hand)."""
    user = [f for f in frames if is_user_file(f.filename)]
    if not user:
        return ""
    f = user[-1]
    return f"{short_path(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


