"""Frontend: source locations and names in trace errors and IR origins.

Where it sits: the leaf of `dsr_compiler.frontend` (imports only torch). `context.TraceContext`
uses it to say where a node came from (`file:line in fn: code`, the innermost frame of the
user's code, never torch's or the frontend's own), and `tracer` to place trace-time `print()`s.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

#: the user's module inside the generated root wrapper (module paths are reported without it)
ROOT_ATTR = "_dsr_root"
_ROOT_FILE = "<dsr_compiler.frontend root>"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
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


def is_user_file(path: str) -> bool:
    """Whether a frame's file is the user's code (not torch, the frontend, or generated code)."""
    return not (os.path.abspath(path).startswith(_TORCH_DIR) or os.path.abspath(path).startswith(FRONTEND_DIR)
                or path == _ROOT_FILE or path.startswith("<"))


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n[ \t]*([^\n]*)')


def location_from_stack_trace(stack_trace: str | None) -> str:
    """`file:line in fn: code` of the innermost user frame of an FX node's recorded stack trace."""
    frames = [f for f in _FRAME_RE.findall(stack_trace or "") if is_user_file(f[0])]
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f"{short_path(path)}:{line} in {fn}: `{code.strip()}`"


def location_from_frames(frames: Sequence[traceback.FrameSummary]) -> str:
    """The same, from a live Python stack or a traceback (no FX node at hand)."""
    user = [f for f in frames if is_user_file(f.filename)]
    if not user:
        return ""
    f = user[-1]
    return f"{short_path(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


