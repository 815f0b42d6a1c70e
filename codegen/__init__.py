"""dsr_compiler.codegen: fused IR kernels -> KernelSpec -> Triton source -> PTX/cubin for sm_90a.

    spec = lower_kernel(kernel, index)        # codegen/lower.py (plain-data KernelSpec, spec.py)
    src  = render(spec)                       # codegen/render.py + templates/<family>.py.j2
    ck   = compile_triton(spec, src)          # codegen/compile.py (PTX, cubin, ptxas stats)
    fn   = load_interpreted(spec, src)        # CPU: fn[grid](*args) under TRITON_INTERPRET=1
"""
from .compile import CompiledKernel, InterpretedKernel, compile_triton, load_interpreted, load_jit
from .lower import lower_kernel
from .render import TEMPLATES, codegen_fingerprint, register_template, render
from .spec import ArgSpec, KernelSpec, Stmt, eval_expr, launch_args, launch_values
from .families import load_extensions, register_family

load_extensions()

__all__ = ["ArgSpec", "CompiledKernel", "InterpretedKernel", "KernelSpec", "Stmt", "TEMPLATES", "codegen_fingerprint",
           "compile_triton", "eval_expr", "launch_args", "launch_values", "load_interpreted", "load_jit",
           "lower_kernel", "register_family", "register_template", "render"]
