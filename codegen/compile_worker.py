"""The compile worker: runs `triton.compile` for `codegen/compile.py` in a separate process.

Where it sits: started by `compile.py` (as a script, `python compile_worker.py`, so it imports only
the standard library and Triton: ~0.6 s) when DSR_COMPILE_TIMEOUT is set, and reused for every
kernel of the process. A compile stuck in LLVM cannot be interrupted inside the process that
runs it; in a worker, the parent waits with a deadline (and for Ctrl-C) and kills the worker.

Protocol on stdin / the original stdout: messages of a 4-byte big-endian length and a JSON body.
Request: {"env", "path", "module", "kernel", "signature", "attrs", "options", "arch"}; reply:
{"ok": true, "asm": {ptx, ttir, ttgir, llir: text; cubin: base64}, "meta": {...}} or
{"ok": false, "error": text}. No code travels: the worker imports the rendered kernel file by path.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import struct
import sys
from typing import Any

_META = ("shared", "global_scratch_size", "profile_scratch_size")


def send(fd: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from fd, or None at end of file."""
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv(fd: int) -> Any:
    head = read_exact(fd, 4)
    if head is None:
        return None
    body = read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def _compile(req: dict[str, Any]) -> dict[str, Any]:
    os.environ.clear()                       # the parent's environment at request time (Triton knobs)
    os.environ.update(req["env"])
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod = sys.modules.get(req["module"])
    if mod is None:
        spec = importlib.util.spec_from_file_location(req["module"], req["path"])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import generated source {req['path']}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[req["module"]] = mod
    attrs = {tuple(k): v for k, v in req["attrs"]}
    src = ASTSource(fn=getattr(mod, req["kernel"]), signature=req["signature"], constexprs={}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", req["arch"], 32), options=req["options"])
    asm = {key: (base64.b64encode(v).decode() if isinstance(v, bytes) else v)
           for key, v in k.asm.items() if key in ("ptx", "cubin", "ttir", "ttgir", "llir")}
    return {"ok": True, "asm": asm, "meta": {m: int(getattr(k.metadata, m, 0) or 0) for m in _META}}


def serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C belongs to the parent, which ends this process
    out = os.dup(1)
    os.dup2(2, 1)                                    # stray prints (Triton, LLVM) go to stderr, not the replies
    while True:
        req = recv(0)
        if req is None:
            return
        try:
            reply = _compile(req)
        except Exception as e:                       # reported to the parent, which raises a CodegenError
            reply = {"ok": False, "error": str(e).strip() or type(e).__name__}
        send(out, reply)


if __name__ == "__main__":
    serve()
