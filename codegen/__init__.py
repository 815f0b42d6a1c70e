"""dsr_compiler.codegen: fused IR kernels -> KernelSpec -> Triton source -> PTX/cubin for sm_90a.

    spec = lower_kernel(kernel, index)        # codegen/lower.py -> the family's lowering (codegen/families/)
    src  = render(spec)                       # codegen/render.py + templates/<family>.py.j2
    ck   = compile_triton(spec, src)          # codegen/compile.py (PTX, cubin, ptxas stats)
    fn   = load_interpreted(spec, src)        # CPU: fn[grid](*args) under TRITON_INTERPRET=1

Every kernel family is one `KernelFamily` record listed in `codegen.families.FAMILIES`.
"""
from .compile import CompiledKernel, InterpretedKernel, compile_triton, load_interpreted, load_jit
from .families import FAMILIES, FAMILY_NAMES, KernelFamily, PtxProgram, family
from .lower import lower_kernel
from .render import codegen_fingerprint, render
from .spec import ArgSpec, KernelSpec, Stmt, eval_expr, launch_args, launch_values

__all__ = ["ArgSpec", "CompiledKernel", "FAMILIES", "FAMILY_NAMES", "InterpretedKernel", "KernelFamily", "KernelSpec",
           "PtxProgram", "Stmt", "codegen_fingerprint", "compile_triton", "eval_expr", "family", "launch_args",
           "launch_values", "load_interpreted", "load_jit", "lower_kernel", "render"]
