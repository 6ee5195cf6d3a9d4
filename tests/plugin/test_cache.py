"""Repair cache: hits, tamper detection, privacy, concurrent writers in separate processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vllm_safeguard.admission.cache import CacheError, RepairCache, make_key


def _build(cache: RepairCache, payload: bytes) -> Path:
    d = cache.staging_dir("build-") / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(payload)
    (d / "adapter_config.json").write_text('{"r": 4}')
    return d


def test_key_depends_on_every_input() -> None:
    base = make_key("a" * 64, "r" * 64, {"method": "nlsr"})
    assert len(base) == 64
    assert base == make_key("a" * 64, "r" * 64, {"method": "nlsr"})
    assert base != make_key("b" * 64, "r" * 64, {"method": "nlsr"})
    assert base != make_key("a" * 64, "s" * 64, {"method": "nlsr"})
    assert base != make_key("a" * 64, "r" * 64, {"method": "safelora"})
    assert base != make_key("a" * 64, "r" * 64, {"method": "nlsr"}, salt="0.2")


def test_put_get_and_tamper_detection(tmp_path: Path) -> None:
    cache = RepairCache(tmp_path / "c")
    key = make_key("x", "y", {})
    assert cache.get(key) is None
    entry = cache.put(key, _build(cache, b"weights"), {"decision": "repaired"})
    assert entry.info == {"decision": "repaired"}
    assert (entry.path / "adapter_model.safetensors").read_bytes() == b"weights"
    again = cache.get(key)
    assert again is not None and again.path == entry.path
    # Tamper with the weights (same size): the memoized check must notice (ctime changes) and drop it.
    time.sleep(0.01)
    (entry.path / "adapter_model.safetensors").write_bytes(b"WEIGHTS")
    assert cache.get(key) is None
    assert not entry.path.exists()
    # ...and a rebuild works.
    entry2 = cache.put(key, _build(cache, b"weights"), {"decision": "repaired"})
    assert cache.get(key) is not None and entry2.path.exists()


def test_tampered_manifest_and_fresh_process_view(tmp_path: Path) -> None:
    cache = RepairCache(tmp_path / "c")
    key = make_key("m", "n", {})
    cache.put(key, _build(cache, b"w"), {})
    (cache.entry_dir(key) / "manifest.json").write_text("{not json")
    assert RepairCache(tmp_path / "c").get(key) is None  # a new process verifies from scratch


def test_warm_hit_does_not_rehash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RepairCache(tmp_path / "c")
    key = make_key("h", "h", {})
    cache.put(key, _build(cache, b"w" * 1000), {})
    import vllm_safeguard.admission.cache as cache_mod

    def boom(_p: object) -> str:
        raise AssertionError("hashed on a warm hit")

    monkeypatch.setattr(cache_mod, "sha256_file", boom)
    assert cache.get(key) is not None


def test_cache_root_must_be_private(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(CacheError, match="writable by other users"):
        RepairCache(root)
    os.chmod(root, 0o700)
    RepairCache(root)


def _writer(root: str, key: str, payload: bytes, barrier: object, out: object) -> None:
    cache = RepairCache(root)
    barrier.wait()  # type: ignore[attr-defined]
    with cache.lock(key):
        entry = cache.get(key)
        built = entry is None
        if entry is None:
            time.sleep(0.05)  # widen the race window
            entry = cache.put(key, _build(cache, payload), {"pid": os.getpid()})
    out.put((built, str(entry.path), entry.info["pid"]))  # type: ignore[attr-defined]


def _racer(root: str, key: str, payload: bytes, barrier: object, out: object) -> None:
    """No lock: both publish; the rename must leave exactly one whole entry."""
    cache = RepairCache(root)
    barrier.wait()  # type: ignore[attr-defined]
    entry = cache.put(key, _build(cache, payload), {"pid": os.getpid()})
    out.put((True, str(entry.path), entry.info["pid"]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("target", [_writer, _racer])
def test_concurrent_processes(tmp_path: Path, target: Callable[..., None]) -> None:
    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    key = make_key("concurrent", "r", {})
    procs = [
        ctx.Process(target=target, args=(str(tmp_path / "c"), key, b"same bytes", barrier, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({r[1] for r in results}) == 1  # everyone got the same entry
    assert len({r[2] for r in results}) == 1  # written by one winner
    if target is _writer:
        assert sum(r[0] for r in results) == 1  # the lock made the others wait, not recompute
    cache = RepairCache(tmp_path / "c")
    entry = cache.get(key)
    assert entry is not None and (entry.path / "adapter_model.safetensors").read_bytes() == b"same bytes"
    assert cache.entries() == [key]
    leftovers = [p for p in (tmp_path / "c" / "tmp").rglob("*") if p.is_file()]
    assert not leftovers  # the losers' folders were removed
