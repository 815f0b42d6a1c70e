"""Reading a dump folder back (DESIGN §3 layout) as untrusted input: report.json as a bounded JSON
object, text files of bounded size, no symlink followed, nothing evaluated. Used by `dsrc diff`
(diff.py) and the HTML report (report_html.py); it imports neither, nor dump.py.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from dsr_compiler.errors import DsrError

MAX_REPORT_BYTES = 64 << 20          # the report of a full-width V3 model is a few MB
MAX_TEXT_BYTES = 64 << 20            # one IR file or generated source
MAX_KERNELS = 100_000
_IR_FILE = re.compile(r"(?P<index>\d{2})_(?P<name>[a-z0-9_]+)\.ir")
_KERNEL_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")


class DumpReadError(DsrError):
    """A dump folder, or a file in it, cannot be read as a dump."""


def read_report(path: Path) -> dict:
    """report.json of a dump folder (marker not checked: also a dump being written), validated as a
    bounded JSON object; DiffError otherwise."""
    text = read_text(path / "report.json", MAX_REPORT_BYTES, path)
    try:
        rep = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DumpReadError(f"{path}/report.json is not valid JSON ({str(e)[:120]})",
                        hint="the dump is damaged: compile it again") from None
    if not isinstance(rep, dict):
        raise DumpReadError(f"{path}/report.json is not a JSON object", hint="the dump is damaged: compile it again")
    return rep


def read_text(p: Path, limit: int, dump: Path) -> str:
    """A regular file (no symlink) of at most `limit` bytes, as UTF-8 text."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise DumpReadError(f"{dump} has no {p.relative_to(dump)}", hint="the dump is incomplete: compile it again") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        raise DumpReadError(f"{p} is not a regular file of at most {limit} bytes", hint="the dump is damaged: compile it again")
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    return data.decode("utf-8", errors="replace")


def kernels_by_name(rep: dict, where: Any) -> dict[str, dict]:
    ks = rep.get("kernels", [])
    if not isinstance(ks, list) or len(ks) > MAX_KERNELS:
        raise DumpReadError(f"{where}/report.json: 'kernels' is not a list of at most {MAX_KERNELS:,} entries",
                        hint="the dump is damaged: compile it again")
    out: dict[str, dict] = {}
    for k in ks:
        name = k.get("name") if isinstance(k, dict) else None
        if not isinstance(name, str) or not _KERNEL_NAME.fullmatch(name):
            raise DumpReadError(f"{where}/report.json: a kernel entry has no valid name ({str(name)[:60]!r})",
                            hint="the dump is damaged: compile it again")
        out[name] = k
    return out


def ir_files(dump: Path) -> dict[str, Path]:
    """pass name -> its `ir/NN_<pass>.ir` file, in pass order."""
    d = dump / "ir"
    if d.is_symlink() or not d.is_dir():
        return {}
    out = {}
    for p in sorted(d.iterdir()):
        m = _IR_FILE.fullmatch(p.name)
        if m:
            out[m.group("name")] = p
    return out


__all__ = ["MAX_KERNELS", "MAX_REPORT_BYTES", "MAX_TEXT_BYTES", "DumpReadError", "ir_files", "kernels_by_name",
           "read_report", "read_text"]
