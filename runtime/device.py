"""Device detection and backend choice for the runtime."""
from __future__ import annotations

import torch

from dsr_compiler.ir.errors import RuntimeLaunchError

BACKENDS = ("auto", "cuda", "interpret")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """`auto` picks `cuda` when a GPU is present, else `interpret` (Triton's CPU interpreter)."""
    if name not in BACKENDS:
        raise RuntimeLaunchError(f"unknown backend {name!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "cuda" if cuda_available() else "interpret"
    if name == "cuda" and not cuda_available():
        raise RuntimeLaunchError("backend 'cuda' asked for, but torch sees no CUDA device",
                                 hint="use --backend interpret to run on the CPU through Triton's interpreter")
    return name
