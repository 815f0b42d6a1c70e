"""Shared by the dump / environment / cache / interrupt robustness tests: the cheapest module
that compiles (one pointwise kernel), compiled against a private artifact cache folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler import knobs


class Tiny(nn.Module):
    """One pointwise kernel: about a second to compile cold, milliseconds warm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2.0


def compile_tiny(cache_dir: Path | str, module: nn.Module | None = None, name: str | None = None):
    with knobs.scoped(DSR_CACHE_DIR=str(cache_dir)):
        return dsr.compile(module or Tiny(), (torch.randn(4, 8),), name=name)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative name -> bytes): compare before / after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    """Hidden leftovers next to a dump folder (`.name.tmp-*`, `.name.old-*`)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def report_graph(dump: Path) -> str:
    return json.loads((dump / "report.json").read_text())["graph"]
