"""Build a LaunchPlan from a fused graph and its compiled kernels, for one backend.

`interpret`: each kernel's Triton source is loaded under TRITON_INTERPRET=1 and runs on CPU
tensors (a direct-PTX kernel runs as its Triton twin). `cuda`: the same source is loaded as a
real `triton.jit` function and launched on the GPU through Triton's launcher (compiled for the
device on first launch; the sm_90a artifacts in the dump are the ahead-of-time record of the
same source); a direct-PTX kernel (report `backend: "ptx"`) is launched from its ptxas cubin
through the CUDA driver API (runtime/cuda_driver.py).
"""
from __future__ import annotations

import torch

from dsr_compiler.codegen.build import KernelArtifact
from dsr_compiler.codegen.compile import load_interpreted, load_jit
from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.ir.graph import Graph
from dsr_compiler.ir.ops import COLLECTIVE, OPS, SOURCE

from .collective import CollectiveStep
from .plan import ConstStep, KernelStep, LaunchPlan, ViewStep


def build_plan(g: Graph, kernels: list[KernelArtifact], backend: str, ep=None) -> LaunchPlan:
    """`ep` (dsr_compiler.ep.ExpertParallel) carries the process group of the plan's all_to_all nodes."""
    by_name = {k.spec.name: k for k in kernels}
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    steps: list = []
    for n in g.nodes:
        if n.op == "call":
            art = by_name.get(n.attr("kernel"))
            if art is None:
                raise RuntimeLaunchError(f"plan: kernel @{n.attr('kernel')} was not compiled")
            spec = art.spec
            if backend == "cuda" and art.ptx is not None:
                from .cuda_driver import load_ptx_kernel   # direct PTX (codegen/ptx.py) via the driver API
                fn, kw = load_ptx_kernel(art.ptx, spec), {}
            else:   # interpret runs a PTX kernel's Triton twin (same KernelSpec, same arguments and grid)
                fn = load_interpreted(spec, art.source) if backend == "interpret" else load_jit(spec, art.source)
                kw = {} if backend == "interpret" else {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
            steps.append(KernelStep(spec.name, spec, fn, list(n.outputs), kw))
        elif n.op == "reshape":
            steps.append(ViewStep(n))
        elif OPS[n.op].kind == COLLECTIVE:
            steps.append(CollectiveStep(n, ep, g.name))
        elif OPS[n.op].kind == SOURCE:
            steps.append(ConstStep(n))
        else:
            raise RuntimeLaunchError(f"plan: top-level op {n.op} is not a kernel call",
                                     hint="the fuse pass must place every compute op in a kernel")
    return LaunchPlan(g, steps, device, ep)
