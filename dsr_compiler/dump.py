"""The dump folder of a CompiledModule (`dsrc compile --out DIR`, `cm.dump(DIR)`; DESIGN §3).

Sits between the api (CompiledModule.dump is a thin call into `write_dump`) and the CLI, which
calls `check_out_dir` before any compile work. The rule that keeps users' data safe: a dump may
replace only a folder that is itself a previous dump, recognised by the `.dsr-dump` marker file
written last into every complete dump. A file, a symlink, a non-empty folder without the marker,
the current directory or one of its ancestors, and the artifact cache (or a folder holding it) are
refused with a DumpError before anything is written.

The dump is written into a hidden sibling `.<name>.tmp-<pid>-<rand>` and swapped in with one
atomic renameat2(RENAME_EXCHANGE) on Linux, so that even a crash leaves the previous dump or the
new one at DIR. Where that call is missing, two renames (previous dump -> `.<name>.old-<pid>-<rand>`,
new -> DIR) with SIGINT held back and the previous dump put back on any exception between them.
Stale siblings left by a killed process are removed on the next dump only if they carry our
marker and their process is gone; our folders are deleted marker last for that reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import functools
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from dsr_compiler.errors import DsrError

CompiledModule = Any               # dsr_compiler.api.CompiledModule (not imported: the api calls into this module)

MARKER = ".dsr-dump"               # written last: its presence means "a complete dsr dump"
PARTIAL = ".dsr-dump.partial"      # written first into a temporary folder: "ours, being written"
FORMAT = "dsr-dump"
VERSION = 1
_MARKER_MAX_BYTES = 4096           # a marker is one short JSON line; anything bigger is not ours
_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{12}")
_FIX = "choose a new or empty folder, or the folder of a previous dump"


class DumpError(DsrError):
    """The dump folder cannot be used (it holds other data) or cannot be written."""


# ----------------------------------------------------------------------------- the --out rule

def is_dump(path: Path) -> bool:
    """True if `path` is a real folder (not a symlink) holding a complete dump's marker."""
    return _has_marker(path, MARKER)


def _has_marker(path: Path, marker: str) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    m = path / marker
    try:
        if m.is_symlink() or not m.is_file() or m.stat().st_size > _MARKER_MAX_BYTES:
            return False
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):   # unreadable, not UTF-8 / JSON, or nested too deep
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _inside(a: Path, b: Path) -> bool:
    """a == b or a is below b (both resolved)."""
    return a == b or b in a.parents


def _show(p: object, limit: int = 200) -> str:
    """A path for a message, cut to `limit` characters (a hostile --out can be kilobytes long)."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(p))   # no raw control characters
    return s if len(s) <= limit else s[: limit // 2] + "..." + s[-limit // 2:]


def check_out_dir(path: str | os.PathLike) -> Path:
    """Refuse an --out that would overwrite data the project did not create, or that cannot be
    written; returns the absolute path. Cheap: the CLI calls it before tracing."""
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw.strip():
        raise DumpError("--out is empty", hint="pass a folder name, e.g. --out out/mlp")
    where = f"--out {_show(raw)}"
    out = Path(os.path.abspath(Path(raw).expanduser()))
    long = [c for c in out.parts if len(os.fsencode(c)) > 255]
    if long or "\0" in raw:
        raise DumpError(f"dump folder {_show(out)} is not a usable path "
                        f"({'a name longer than 255 bytes' if long else 'a NUL character'})", where, _FIX)
    try:
        return _check(out, raw, where)
    except OSError as e:              # e.g. ENAMETOOLONG, ELOOP, EACCES while looking the path up
        raise DumpError(f"cannot use dump folder {_show(out)}: {e.strerror or e}", where, _FIX) from None


def _check(out: Path, raw: str, where: str) -> Path:
    from dsr_compiler import knobs
    if out.is_symlink():
        raise DumpError(f"dump folder {_show(out)} is a symbolic link; a dump never writes through a link",
                        where, f"pass the link's target ({_show(os.path.realpath(out))}) or another folder")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        what = "the current directory" if real == cwd else "a parent of the current directory"
        raise DumpError(f"dump folder {_show(out)} is {what}; a dump replaces its folder, which would delete it",
                        where, f"{_FIX}, e.g. --out {_show(Path(raw) / 'dump')}")
    cache = Path(knobs.get("DSR_CACHE_DIR")).expanduser().resolve()
    if _inside(cache, real) or _inside(real, cache):
        raise DumpError(f"dump folder {_show(out)} is, holds or lies inside the artifact cache {_show(cache)}",
                        where, f"{_FIX} outside the cache (DSR_CACHE_DIR)")
    if out.exists():
        _check_existing(out, where)
    _check_writable(out, where)
    return out


def _check_existing(out: Path, where: str) -> None:
    if not out.is_dir():
        raise DumpError(f"dump folder {_show(out)} exists and is a file, not a folder", where,
                        f"{_FIX}; remove the file yourself if it is not needed")
    if is_dump(out):
        return
    try:
        with os.scandir(out) as it:
            empty = next(it, None) is None
    except OSError as e:
        raise DumpError(f"cannot read dump folder {_show(out)}: {e.strerror}", where, _FIX) from None
    if not empty:
        raise DumpError(f"dump folder {_show(out)} is not empty and is not a dsr dump (no {MARKER} marker); "
                        "refusing to replace it", where, f"{_FIX}; only folders written by `dsrc compile --out` "
                        "are replaced")


def _check_writable(out: Path, where: str) -> None:
    """The dump is written next to `out`, so the nearest existing ancestor must be a writable folder."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DumpError(f"cannot create dump folder {_show(out)}: {_show(anc)} is a file, not a folder",
                        where, _FIX)
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DumpError(f"cannot write dump folder {_show(out)}: no write permission in {_show(anc)} "
                        "(or it is read-only)", where, "choose a writable folder for --out")


# ----------------------------------------------------------------------------- writing

def write_dump(cm: "CompiledModule", out_dir: str | os.PathLike) -> Path:
    """Write `cm`'s dump to `out_dir` (rules above); returns the folder. OSError -> DumpError."""
    out = check_out_dir(out_dir)
    where = f"dump folder {_show(out)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
        tmp.mkdir()                    # os.mkdir honours the umask (tempfile.mkdtemp would give 0700)
    except OSError as e:
        raise _env_error(e, out, where) from None
    try:
        _marker(tmp, PARTIAL, cm.graph.name)
        _write_contents(cm, tmp)
        _marker(tmp, MARKER, cm.graph.name)
        (tmp / PARTIAL).unlink()
        _swap(tmp, out)
    except OSError as e:
        raise _env_error(e, out, where) from None
    finally:
        if tmp.exists():               # ours: the unfinished dump, or the previous one after an exchange
            _remove_ours(tmp)
    return out


def _marker(folder: Path, name: str, graph: str) -> None:
    text = json.dumps({"format": FORMAT, "version": VERSION, "graph": graph, "writer": "dsr_compiler"})
    (folder / name).write_text(text + "\n", encoding="utf-8")


def _write_contents(cm: "CompiledModule", tmp: Path) -> None:
    from dsr_compiler.ir.printer import header_line, print_graph
    (tmp / "ir").mkdir()
    (tmp / "kernels").mkdir()
    total = len(cm.passes) - 1
    prev = ""
    for r in cm.passes:
        text = print_graph(r.graph, header_line(r.graph, r.index, total, r.name, r.ms))
        stem = f"{r.index:02d}_{r.name}"
        (tmp / "ir" / f"{stem}.ir").write_text(text)
        body = text.split("\n", 1)[1]
        diff = difflib.unified_diff(prev.splitlines(keepends=True), body.splitlines(keepends=True),
                                    fromfile="previous", tofile=stem)
        (tmp / "ir" / f"{stem}.diff").write_text("".join(diff))
        prev = body
    for k in cm.kernels:
        kdir = tmp / "kernels"
        (kdir / f"{k.spec.name}.py").write_text(k.source)
        twin = ".triton" if k.ptx is not None else ""   # a PTX kernel: <name>.ptx is the template's
        (kdir / f"{k.spec.name}{twin}.ptx").write_text(k.compiled.ptx)
        (kdir / f"{k.spec.name}{twin}.cubin").write_bytes(k.compiled.cubin)
        if k.ptx is not None:
            (kdir / f"{k.spec.name}.ptx").write_text(k.ptx.ptx)
            (kdir / f"{k.spec.name}.cubin").write_bytes(k.ptx.cubin)
    (tmp / "report.json").write_text(json.dumps(cm.report(), indent=2, sort_keys=False, default=str) + "\n")
    from dsr_compiler.report_html import render_dump_html
    (tmp / "report.html").write_text(render_dump_html(tmp), encoding="utf-8")   # from the files just written


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT back (delivered right after the block) so Ctrl-C cannot land between two renames."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def _swap(tmp: Path, out: Path) -> None:
    """Move the finished dump `tmp` to `out`; `out` always holds the previous content or the new one.
    After an exchange `tmp` holds the previous dump, which the caller removes."""
    with _sigint_held():
        if not out.exists():
            os.rename(tmp, out)
            return
        if not is_dump(out):           # checked empty before the compile: rmdir refuses if that changed
            try:
                os.rmdir(out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise DumpError(f"dump folder {_show(out)} was filled by something else during the "
                                    "compile; refusing to replace it", f"dump folder {_show(out)}", _FIX) from None
                raise
            os.rename(tmp, out)
            return
        if _exchange(tmp, out):        # one atomic step: even a crash leaves one of the two dumps at `out`
            return
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(6)}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)        # put the previous dump back before reporting
            raise
    _remove_ours(old)                  # a previous dump (marker checked): ours to delete


_RENAME_EXCHANGE = 2                   # linux/fs.h
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None                    # libc without renameat2 (glibc < 2.28, musl < 1.2.?)
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False                   # kernel or file system without it: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _remove_ours(p: Path) -> None:
    """Delete a folder we wrote, its markers last, so that a removal cut short by Ctrl-C leaves a
    folder that the next dump still recognises as ours and cleans up."""
    try:
        with os.scandir(p) as it:
            entries = list(it)
    except OSError:
        return
    for e in entries:
        if e.name in (MARKER, PARTIAL):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(e.path)
    for m in (MARKER, PARTIAL):
        with contextlib.suppress(OSError):
            os.unlink(p / m)
    with contextlib.suppress(OSError):
        os.rmdir(p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False                   # our own leftovers (an earlier dump in this process)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # gone, or a number no process can have
        return False
    except OSError:
        return True                    # exists, owned by someone else
    return True


def _remove_stale(out: Path) -> None:
    """Delete `.<name>.tmp-*` / `.<name>.old-*` siblings left by a killed dump of the same folder:
    only real folders carrying our marker (complete or partial) whose writing process is gone."""
    try:
        with os.scandir(out.parent) as it:
            entries = list(itertools.islice(it, 100_000))   # bounded: a huge parent is scanned in part
    except OSError:
        return
    for e in entries:
        m = _STALE.fullmatch(e.name)
        if m is None or m.group("name") != out.name or _pid_alive(int(m.group("pid"))):
            continue
        p = Path(e.path)
        if _has_marker(p, MARKER) or _has_marker(p, PARTIAL):
            _remove_ours(p)


def _env_error(e: OSError, out: Path, where: str) -> DumpError:
    hints = {errno.ENOSPC: "free some disk space or choose another --out",
             errno.EDQUOT: "free some quota or choose another --out",
             errno.EROFS: "the file system is read-only: choose a writable folder for --out",
             errno.EACCES: "no permission: choose a writable folder for --out",
             errno.EPERM: "no permission: choose a writable folder for --out"}
    why = e.strerror or type(e).__name__
    name = f" ({_show(e.filename)})" if e.filename else ""
    return DumpError(f"cannot write the dump to {_show(out)}: {why}{name}", where,
                     hints.get(e.errno or 0, "check that --out is a writable folder with free space"))
