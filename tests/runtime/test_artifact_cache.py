"""The artifact cache as a unit (runtime/cache.py): atomic writes, verification on read, eviction.

The hostile-input cases (short or hostile manifests, symlinks, interrupts, unwritable folders) are
in tests/robustness/test_cache.py and test_environment.py; this file pins the ordinary contract.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import pytest
from dsr_compiler.runtime.cache import ArtifactCache, cache_key

FILES = {"meta.json": b'{"name": "k1"}', "kernel.ptx": b"// ptx\n" * 100}


def _key(i: int = 0) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_dir() and len(p.name) == 64)


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


def test_put_then_get_returns_the_same_bytes_and_counts(tmp_path):
    c = ArtifactCache(tmp_path, enabled=True)
    assert c.get(_key(), required=("meta.json",)) is None
    c.put(_key(), FILES)
    assert c.get(_key(), required=tuple(FILES)) == FILES
    assert (c.hits, c.misses, c.evictions) == (1, 1, 0)
    entry = tmp_path / _key()[:2] / _key()
    assert sorted(os.listdir(entry)) == sorted([*FILES, "manifest.json"])
    assert _leftovers(tmp_path) == []


def test_key_depends_on_every_part():
    base = cache_key("a" * 64, "sm_90a")
    assert len(base) == 64 and all(ch in "0123456789abcdef" for ch in base)
    assert cache_key("b" * 64, "sm_90a") != base
    assert cache_key("a" * 64, "sm_100a") != base
    assert cache_key("a" * 64, "sm_90a") == base


@pytest.mark.parametrize("key", ["", "A" * 64, "0" * 63, "../" + "0" * 61, None])
def test_malformed_keys_are_refused(tmp_path, key):
    c = ArtifactCache(tmp_path, enabled=True)
    with pytest.raises(ValueError, match="bad artifact cache key"):
        c.get(key)


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "manifest.json", ""])
def test_bad_file_names_are_refused_before_writing(tmp_path, name):
    c = ArtifactCache(tmp_path, enabled=True)
    with pytest.raises(ValueError, match="bad artifact file name"):
        c.put(_key(), {name: b"x"})
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_file_is_a_miss_and_the_entry_is_rewritten(tmp_path):
    c = ArtifactCache(tmp_path, enabled=True)
    c.put(_key(), FILES)
    (tmp_path / _key()[:2] / _key() / "kernel.ptx").write_bytes(b"// tampered\n")
    assert c.get(_key(), required=tuple(FILES)) is None
    assert c.evictions == 1 and _entries(tmp_path) == []
    c.put(_key(), FILES)
    assert c.get(_key(), required=tuple(FILES)) == FILES


def test_a_valid_entry_is_kept_by_a_second_put(tmp_path):
    c = ArtifactCache(tmp_path, enabled=True)
    c.put(_key(), FILES)
    manifest = tmp_path / _key()[:2] / _key() / "manifest.json"
    before = manifest.stat().st_mtime_ns
    os.utime(manifest, ns=(before - 10**9, before - 10**9))
    c.put(_key(), FILES)
    assert manifest.stat().st_mtime_ns == before - 10**9      # not rewritten
    assert c.get(_key(), required=tuple(FILES)) == FILES


def test_a_disabled_cache_reads_and_writes_nothing(tmp_path):
    c = ArtifactCache(tmp_path / "c", enabled=False)
    c.put(_key(), FILES)
    assert c.get(_key()) is None
    assert not (tmp_path / "c").exists()


def _racer(root: str, key: str, barrier, n: int) -> None:
    c = ArtifactCache(Path(root), enabled=True)
    barrier.wait()
    for _ in range(n):
        c.put(key, FILES)


def test_concurrent_puts_of_one_key_leave_one_valid_entry(tmp_path):
    """Processes racing to store the same kernel: each write goes to its own temporary folder and is
    renamed into place, so the entry is always complete and no temporary folder is left."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), _key(), barrier, 20)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = ArtifactCache(tmp_path, enabled=True)
    assert c.get(_key(), required=tuple(FILES)) == FILES
    assert _entries(tmp_path) == [tmp_path / _key()[:2] / _key()]
    assert _leftovers(tmp_path) == []


def test_many_keys_share_prefix_folders(tmp_path):
    c = ArtifactCache(tmp_path, enabled=True)
    for i in range(40):
        c.put(_key(i), {"meta.json": str(i).encode()})
    for i in range(40):
        assert c.get(_key(i), required=("meta.json",)) == {"meta.json": str(i).encode()}
    assert len(_entries(tmp_path)) == 40
    assert all(p.parent.name == p.name[:2] for p in _entries(tmp_path))
