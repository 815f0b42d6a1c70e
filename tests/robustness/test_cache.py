"""The artifact cache (runtime/cache.py) trusts only complete, verified entries.

A manifest listing too few files used to crash every later compile (KeyError: 'meta.json'), and a
deleted file made a permanent miss (put() returned early because the folder existed). An entry is
valid only if every required file is listed and matches its hash; anything else is evicted and
rewritten. Eviction stays inside the cache root and never follows a symlink; manifest JSON from
disk is bounded and type-checked; Ctrl-C during a put leaves no temporary folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dsr_compiler.runtime.cache import ArtifactCache
from tests.robustness.io_helpers import compile_tiny, snapshot

KEY = "ab" + "0" * 62
FILES = {"meta.json": b'{"registers": 1}', "kernel.ptx": b"ptx", "kernel.cubin": b"\x00cubin"}
REQ = tuple(FILES)


def _entry(root: Path, key: str = KEY) -> Path:
    return root / key[:2] / key


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, obj) -> None:
    (d / "manifest.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    c = ArtifactCache(tmp_path / "cache", enabled=True)
    c.put(KEY, FILES)
    assert c.get(KEY, required=REQ) == FILES
    return c


def test_short_manifest_is_evicted_and_rewritten(cache):
    d = _entry(cache.root)
    m = _manifest(d)
    del m["files"]["meta.json"]
    _write_manifest(d, m)
    assert cache.get(KEY, required=REQ) is None         # listed files verify, but meta.json is required
    assert not d.exists()                                # evicted
    cache.put(KEY, FILES)
    assert cache.get(KEY, required=REQ) == FILES


def test_deleted_file_is_rewritten_by_put(cache):
    d = _entry(cache.root)
    (d / "kernel.cubin").unlink()
    assert cache.get(KEY, required=REQ) is None
    cache.put(KEY, FILES)                                # used to return early: the folder existed
    assert cache.get(KEY, required=REQ) == FILES


def test_put_replaces_an_invalid_entry_even_before_a_get(cache):
    d = _entry(cache.root)
    (d / "kernel.ptx").write_bytes(b"corrupt")
    cache.put(KEY, FILES)
    assert (d / "kernel.ptx").read_bytes() == b"ptx" and cache.get(KEY, required=REQ) == FILES


@pytest.mark.parametrize("manifest", [
    "[1, 2]", '{"files": [1, 2]}', '{"files": {"kernel.ptx": 5}}', '{"files": {"../../escape": "' + "0" * 64 + '"}}',
    '{"files": {"/etc/passwd": "' + "0" * 64 + '"}}', '{"files": {".hidden": "' + "0" * 64 + '"}}',
    "[" * 100_000, "not json", '{"files": {"kernel.ptx": "nothex"}}',
])
def test_hostile_manifest_is_evicted_without_reading_outside(cache, manifest):
    d = _entry(cache.root)
    _write_manifest(d, manifest)
    assert cache.get(KEY, required=REQ) is None
    assert not d.exists()


def test_oversized_manifest_is_not_read(cache):
    d = _entry(cache.root)
    big = {"files": {f"f{i}": "0" * 64 for i in range(5000)}}  # ~400 KB, thousands of names
    _write_manifest(d, big)
    assert cache.get(KEY, required=REQ) is None and not d.exists()


def test_listed_file_that_is_a_symlink_is_not_followed(cache, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"ptx")                           # same bytes, same hash: still refused
    d = _entry(cache.root)
    (d / "kernel.ptx").unlink()
    (d / "kernel.ptx").symlink_to(outside)
    assert cache.get(KEY, required=REQ) is None
    assert outside.read_bytes() == b"ptx"


def test_eviction_never_follows_symlinks_out_of_the_root(tmp_path):
    root = tmp_path / "cache"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / KEY).mkdir(parents=True)
    (elsewhere / KEY / "manifest.json").write_text("garbage")     # an invalid-looking "entry" outside
    (elsewhere / KEY / "precious.txt").write_text("keep")
    root.mkdir()
    (root / KEY[:2]).symlink_to(elsewhere)                        # prefix folder is a link out of the root
    c = ArtifactCache(root, enabled=True)
    before = snapshot(elsewhere)
    assert c.get(KEY, required=REQ) is None
    with pytest.warns(UserWarning, match="artifact cache"):
        c.put(KEY, FILES)
    assert snapshot(elsewhere) == before

    root2 = tmp_path / "cache2"
    (root2 / KEY[:2]).mkdir(parents=True)
    (root2 / KEY[:2] / KEY).symlink_to(elsewhere / KEY)           # the entry itself is a link
    c2 = ArtifactCache(root2, enabled=True)
    assert c2.get(KEY, required=REQ) is None
    assert snapshot(elsewhere) == before and not os.path.lexists(root2 / KEY[:2] / KEY)


def test_foreign_files_in_the_root_are_left_alone(cache):
    (cache.root / "triton_src").mkdir()
    (cache.root / "triton_src" / "k.py").write_text("x")
    (cache.root / "notes.txt").write_text("mine")
    (cache.root / "ab" / "not-a-key").mkdir()
    with pytest.raises(ValueError):
        cache.get("../../notes", required=REQ)                    # keys are 64 hex digits, nothing else
    with pytest.raises(ValueError):
        cache.evict("ab")
    assert (cache.root / "notes.txt").read_text() == "mine" and (cache.root / "ab" / "not-a-key").is_dir()


def test_interrupt_during_put_leaves_no_temporary_folder(tmp_path, monkeypatch):
    c = ArtifactCache(tmp_path / "cache", enabled=True)
    real = Path.write_bytes

    def interrupted(self, data):
        if self.name == "kernel.cubin":
            raise KeyboardInterrupt
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        c.put(KEY, FILES)
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == [KEY[:2]]   # only the prefix folder


def test_compile_survives_short_manifest_and_deleted_files(tmp_path):
    """The reported crash end to end: KeyError: 'meta.json' in codegen.build.compile_cached on every compile."""
    root = tmp_path / "cache"
    cm = compile_tiny(root)
    assert not any(k.cached for k in cm.kernels)
    (entry,) = [p.parent for p in root.glob("??/*/manifest.json")]
    m = _manifest(entry)
    del m["files"]["meta.json"]
    _write_manifest(entry, m)
    cm = compile_tiny(root)                                       # used to raise KeyError
    assert not any(k.cached for k in cm.kernels)
    assert "meta.json" in _manifest(entry)["files"]               # rewritten complete
    assert all(k.cached for k in compile_tiny(root).kernels)
    (entry / "kernel.ttgir").unlink()
    assert not any(k.cached for k in compile_tiny(root).kernels)
    assert all(k.cached for k in compile_tiny(root).kernels)      # no permanent miss


def test_bad_meta_json_is_evicted(tmp_path):
    root = tmp_path / "cache"
    compile_tiny(root)
    (entry,) = [p.parent for p in root.glob("??/*/manifest.json")]
    bad = json.dumps({"registers": "lots", "name": "k"}).encode()
    (entry / "meta.json").write_bytes(bad)
    m = _manifest(entry)
    m["files"]["meta.json"] = hashlib.sha256(bad).hexdigest()    # consistent manifest, hostile content
    _write_manifest(entry, m)
    cm = compile_tiny(root)
    assert not any(k.cached for k in cm.kernels) and cm.kernels[0].compiled.registers > 0
    assert all(k.cached for k in compile_tiny(root).kernels)
