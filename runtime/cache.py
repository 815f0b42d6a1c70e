"""Content-addressed on-disk artifact cache.

Key: sha256 over (kernel spec hash, dsr_compiler / triton / torch versions, target). An
entry is a folder of plain files plus `manifest.json` holding each file's sha256; it is
written to a temporary folder and renamed into place (atomic, so concurrent compiles of the
same kernel are safe: the loser drops its copy), and verified against the manifest on read
(a corrupt entry is discarded, never trusted). Nothing is ever unpickled: JSON and bytes only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
import triton

import dsr_compiler
from dsr_compiler import knobs


def cache_key(spec_hash: str, target: str) -> str:
    h = hashlib.sha256()
    for part in (spec_hash, dsr_compiler.__version__, triton.__version__, torch.__version__, target):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path | None = None, enabled: bool | None = None):
        self.root = Path(root) if root is not None else Path(knobs.get("DSR_CACHE_DIR"))
        self.enabled = (not knobs.get("DSR_NO_CACHE")) if enabled is None else enabled
        self.hits = 0
        self.misses = 0

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> dict[str, bytes] | None:
        """The entry's files by name, or None (missing or failed verification)."""
        if not self.enabled:
            return None
        d = self._dir(key)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            files = {}
            for name, digest in manifest["files"].items():
                data = (d / name).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError(f"hash mismatch in {name}")
                files[name] = data
        except FileNotFoundError:
            self.misses += 1
            return None
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            shutil.rmtree(d, ignore_errors=True)  # corrupt: drop it and recompile
            self.misses += 1
            return None
        self.hits += 1
        return files

    def put(self, key: str, files: Mapping[str, bytes]) -> None:
        if not self.enabled:
            return
        d = self._dir(key)
        if d.exists():
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
        try:
            manifest = {"files": {}}
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"bad artifact file name {name!r}")
                (tmp / name).write_bytes(data)
                manifest["files"][name] = hashlib.sha256(data).hexdigest()
            (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
            try:
                os.rename(tmp, d)
            except OSError:
                pass  # another process won the race; its entry is equivalent
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
