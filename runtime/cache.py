"""Content-addressed on-disk artifact cache (installed as dsr_compiler.runtime.cache).

Key: sha256 over (kernel spec hash, dsr_compiler / triton / torch versions, target). An entry is
the folder `<root>/<key[:2]>/<key>` of plain files plus `manifest.json` holding each file's sha256.
It is written to a temporary folder and renamed into place (atomic, so concurrent compiles of the
same kernel are safe: the loser drops its copy), and verified on read: an entry is valid only if
its manifest lists every file the caller requires and every listed file matches its hash. Anything
else (short manifest, deleted or corrupt file, hostile JSON) is evicted, and the next `put`
replaces it. Nothing is ever unpickled: JSON and bytes only.

The cache is best effort: a folder that cannot be read or written (a file where the folder should
be, read-only, full disk) gives one CacheWarning per cache and the compile goes on uncached.
Eviction deletes only folders inside the root whose path matches the key layout, never through a
symlink. Temporary folders are removed in `finally`, so Ctrl-C leaves none behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import triton

from dsr_compiler.ir import knobs
from dsr_compiler.ir.version import VERSION

_KEY = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")   # a plain file name: no '/', no leading '.'
_MANIFEST_MAX_BYTES = 64 * 1024          # a manifest lists a handful of names and hashes
_MAX_FILES = 64
_FILE_MAX_BYTES = 1 << 30                # a cubin or PTX is MBs; refuse to read anything absurd


class CacheWarning(UserWarning):
    """The artifact cache could not be read or written; the compile went on without it."""


class _Invalid(Exception):
    """The entry on disk is not a valid entry (evict it)."""


def cache_key(spec_hash: str, target: str) -> str:
    h = hashlib.sha256()
    for part in (spec_hash, VERSION, triton.__version__, torch.__version__, target):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path | None = None, enabled: bool | None = None):
        self.root = Path(root) if root is not None else Path(knobs.get("DSR_CACHE_DIR"))
        self.enabled = (not knobs.get("DSR_NO_CACHE")) if enabled is None else enabled
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._warned = False

    def key(self, content: str, target: str) -> str:
        """The entry key of `content` (what is built: spec, fingerprint, source hashes) for `target`."""
        return cache_key(content, target)

    # ------------------------------------------------------------------ layout
    def _dir(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"bad artifact cache key {key!r} (expected 64 lowercase hex digits)")
        return self.root / key[:2] / key

    def _warn(self, what: str, e: BaseException) -> None:
        if not self._warned:            # once per cache: a broken folder would otherwise warn per kernel
            self._warned = True
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            warnings.warn(f"artifact cache {self.root}: {what} failed ({why}); compiling without the cache "
                          "(set DSR_CACHE_DIR to a writable folder, or DSR_NO_CACHE=1)", CacheWarning, stacklevel=3)

    # ------------------------------------------------------------------ read
    def get(self, key: str, required: Iterable[str] = ()) -> dict[str, bytes] | None:
        """The entry's files by name, or None (missing, or invalid: then it is evicted)."""
        if not self.enabled:
            return None
        d = self._dir(key)
        try:
            if not os.path.lexists(d):
                self.misses += 1
                return None
            files = _read_entry(d, tuple(required))
        except _Invalid:
            self.evict(key)
            self.misses += 1
            return None
        except OSError as e:
            self._warn("reading an entry", e)
            self.misses += 1
            return None
        self.hits += 1
        return files

    def evict(self, key: str) -> None:
        """Delete the entry of `key` if it is a folder of the cache's own layout (a symlink in its
        place is unlinked, never followed)."""
        d = self._dir(key)
        try:
            if not self._owned(d):
                return
            if d.is_symlink() or not d.is_dir():
                d.unlink()
            else:
                shutil.rmtree(d)
            self.evictions += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            self._warn("evicting an invalid entry", e)

    def _owned(self, d: Path) -> bool:
        """`d` is <root>/<xx>/<key> with <xx> a real folder (not a symlink out of the root)."""
        prefix = d.parent
        try:
            st = os.lstat(prefix)
        except OSError:
            return False
        inside = Path(os.path.realpath(prefix)) == Path(os.path.realpath(self.root)) / prefix.name
        return stat.S_ISDIR(st.st_mode) and inside

    # ------------------------------------------------------------------ write
    def put(self, key: str, files: Mapping[str, bytes]) -> None:
        """Store `files` under `key`. An existing valid entry with the same names is kept; an invalid
        one is replaced. Failures to write are a CacheWarning, never an error."""
        if not self.enabled:
            return
        d = self._dir(key)
        for name in files:
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "manifest.json":
                raise ValueError(f"bad artifact file name {name!r}")
        try:
            self._put(key, d, files)
        except OSError as e:
            self._warn("writing an entry", e)

    def _put(self, key: str, d: Path, files: Mapping[str, bytes]) -> None:
        if os.path.lexists(d):
            try:
                _read_entry(d, tuple(files))
                return                  # a valid equivalent entry (another process was first)
            except (_Invalid, OSError):
                pass
        d.parent.mkdir(parents=True, exist_ok=True)
        if not self._owned(d):
            raise NotADirectoryError(0, "the entry's prefix folder is not a plain folder inside the cache",
                                     str(d.parent))
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
        try:
            manifest: dict[str, Any] = {"files": {}}
            for name, data in files.items():
                (tmp / name).write_bytes(data)
                manifest["files"][name] = hashlib.sha256(data).hexdigest()
            (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
            if os.path.lexists(d):
                self.evict(key)         # invalid (checked above): replace it
            try:
                os.rename(tmp, d)
            except OSError:
                if not os.path.isdir(d):
                    raise
                # another process won the race; its entry is equivalent
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _read_entry(d: Path, required: tuple[str, ...]) -> dict[str, bytes]:
    """Read and verify one entry; _Invalid for anything that is not a complete, intact entry."""
    if d.is_symlink() or not d.is_dir():
        raise _Invalid("not a folder")
    manifest = _read_manifest(d / "manifest.json")
    missing = [n for n in required if n not in manifest]
    if missing:
        raise _Invalid(f"manifest lacks {missing}")
    files = {}
    for name, digest in manifest.items():
        data = _read_file(d / name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise _Invalid(f"hash mismatch in {name}")
        files[name] = data
    return files


def _read_manifest(p: Path) -> dict[str, str]:
    """The manifest's name -> sha256 map; JSON from disk is untrusted: bounded, type-checked."""
    raw = _read_file(p, _MANIFEST_MAX_BYTES)
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Invalid(f"manifest is not JSON: {e}") from None
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or len(files) > _MAX_FILES:
        raise _Invalid("manifest has no 'files' object of bounded size")
    for name, digest in files.items():
        if not _NAME.fullmatch(name) or name == "manifest.json":
            raise _Invalid(f"bad file name {name!r} in manifest")
        if not isinstance(digest, str) or not _KEY.fullmatch(digest):
            raise _Invalid(f"bad digest for {name!r} in manifest")
    return files


def _read_file(p: Path, limit: int = _FILE_MAX_BYTES) -> bytes:
    """Bytes of a regular file (no symlink) of at most `limit` bytes; _Invalid if it is not one."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise _Invalid(f"{p.name} is missing") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        raise _Invalid(f"{p.name} is not a regular file of at most {limit} bytes")
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))   # swapped for a link since lstat: refuse
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _Invalid(f"{p.name} grew past {limit} bytes")
    return data
