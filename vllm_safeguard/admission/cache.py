"""Content-addressed, tamper-evident, multi-process-safe cache of repaired adapters.

Key: sha256 over (adapter bytes digest, reference content hash, method config, package version).
Entry: ``<root>/entries/<key[:2]>/<key>/`` holding the adapter as vLLM will read it
(``adapter_config.json`` + ``adapter_model.safetensors``) and ``manifest.json`` (sha256 of each file,
the decision and the repair report), written last.

* Atomic: an entry is built in ``<root>/tmp/`` and renamed into place; a reader sees a whole entry or
  none. Two processes racing on the same key both produce identical bytes; the loser's rename fails
  and it uses the winner's entry. A per-key ``flock`` makes the loser wait instead of recomputing.
* Verified: every file's sha256 is checked against the manifest before the entry is handed out. A
  mismatch (corruption, tampering) deletes the entry and reports a miss, so the repair is redone.
  The check is memoized per process by the files' (inode, size, mtime, ctime): a warm hit stats three
  files and hashes nothing. Any write to a file changes its ctime, which re-arms the check.
* Crash-safe: a process killed mid-write leaves at most a folder in ``<root>/tmp/`` (never a half
  entry under ``entries/``); such leftovers older than :data:`STALE_TMP_S` are swept when a process
  opens the cache.
* Private: the root is created ``0700`` and refused if another user owns it or others can write to it,
  because vLLM reads whatever this cache hands out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SafeguardError

logger = logging.getLogger("vllm_safeguard")

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20
STALE_TMP_S = 3600.0  # a staging folder this old belongs to a dead writer (repairs take seconds)


class CacheError(SafeguardError):
    """The cache directory is unusable (not private, not writable)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Stable JSON for hashing (sorted keys, no whitespace, paths and other objects as strings)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(
    adapter_digest: str, reference_hash: str, method_config: Mapping[str, Any], *, salt: str = ""
) -> str:
    """The cache key of one (adapter bytes, reference, method config) triple."""
    payload = canonical_json(
        {
            "format": FORMAT_VERSION,
            "adapter": adapter_digest,
            "reference": reference_hash,
            "method": dict(method_config),
            "salt": salt,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _stat_sig(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class CacheEntry:
    """A verified entry: ``path`` is the adapter folder to hand vLLM."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """The caller's metadata stored with the entry (decision, report ...)."""
        return dict(self.manifest.get("info", {}))


class RepairCache:
    """See module docstring. One instance per process and root; cheap to construct."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self._verified: dict[str, tuple[tuple[int, int, int, int], ...]] = {}
        self._ensure_private_root()
        self.sweep_tmp()

    # ------------------------------------------------------------------ layout
    def _ensure_private_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for sub in ("entries", "tmp", "locks"):
                (self.root / sub).mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise CacheError(f"repair cache {str(self.root)!r} is not writable: {e}") from e
        st = os.stat(self.root)
        if st.st_uid != os.getuid():
            raise CacheError(
                f"repair cache {str(self.root)!r} is owned by uid {st.st_uid}, not by us ({os.getuid()})"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CacheError(
                f"repair cache {str(self.root)!r} is writable by other users (mode {oct(st.st_mode & 0o777)}); "
                "vLLM loads what this cache holds, so it must be private (chmod 700)"
            )

    def sweep_tmp(self, max_age_s: float = STALE_TMP_S) -> int:
        """Remove staging folders left by writers that died mid-write; return how many."""
        removed = 0
        now = time.time()
        with contextlib.suppress(OSError):
            for p in (self.root / "tmp").iterdir():
                with contextlib.suppress(OSError):
                    if now - p.lstat().st_mtime > max_age_s:
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink()
                        removed += 1
        return removed

    def entry_dir(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / "entries" / key[:2] / key

    def staging_dir(self, prefix: str = "stage-") -> Path:
        """A fresh private temp folder on the cache's filesystem (so a later rename is atomic)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))

    # ------------------------------------------------------------------ read
    def get(self, key: str) -> CacheEntry | None:
        """The verified entry for ``key``, or None (missing, or failed verification and was dropped)."""
        folder = self.entry_dir(key)
        mpath = folder / MANIFEST_NAME
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            if os.path.lexists(folder):
                # Entries are published whole (manifest included) by one rename, so a folder without a
                # manifest is damage; left in place it would block every future publish of this key.
                self._drop(folder, "manifest missing")
            return None
        except (OSError, ValueError) as e:
            self._drop(folder, f"unreadable manifest: {e}")
            return None
        try:
            files: dict[str, str] = manifest["files"]
            if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION or not files:
                raise ValueError("manifest does not describe this key")
            sigs = (*(_stat_sig(folder / name) for name in sorted(files)), _stat_sig(mpath))
            if self._verified.get(key) != sigs:
                for name, digest in files.items():
                    if "/" in name or name.startswith("."):
                        raise ValueError(f"bad file name {name!r} in manifest")
                    actual = sha256_file(folder / name)
                    if actual != digest:
                        raise ValueError(f"{name}: sha256 {actual[:12]} != manifest {digest[:12]}")
                self._verified[key] = sigs
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._drop(folder, str(e))
            return None
        return CacheEntry(key, folder, manifest)

    def _drop(self, folder: Path, why: str) -> None:
        logger.warning(
            "vllm-safeguard: repair cache entry %s failed verification (%s); rebuilding", folder.name, why
        )
        self._verified.pop(folder.name, None)
        # Move aside first (atomic) so a concurrent reader never sees a half-deleted entry.
        with contextlib.suppress(OSError):
            trash = self.staging_dir("trash-")
            os.replace(folder, trash / "x")
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ write
    def put(self, key: str, built: Path, info: Mapping[str, Any]) -> CacheEntry:
        """Publish the adapter folder ``built`` (inside :meth:`staging_dir`) under ``key``.

        ``built`` is consumed (renamed). If another process published the key first, its entry wins
        and ``built`` is deleted.
        """
        files = {
            p.name: sha256_file(p) for p in sorted(built.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "created_unix": time.time(),
            "files": files,
            "info": dict(info),
        }
        (built / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        for p in built.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(built, 0o700)
        folder = self.entry_dir(key)
        folder.parent.mkdir(exist_ok=True, mode=0o700)
        try:
            os.rename(built, folder)  # fails if the target exists and is non-empty: first writer wins
        except OSError:
            shutil.rmtree(built, ignore_errors=True)
            existing = self.get(key)
            if existing is not None:
                return existing
            raise
        with contextlib.suppress(OSError):  # make the rename durable
            dfd = os.open(folder.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        entry = self.get(key)
        if entry is None:
            raise CacheError(f"repair cache entry {key[:12]} vanished right after it was written")
        return entry

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock across processes (``flock``; released if the holder dies)."""
        self.entry_dir(key)  # validates the key
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def entries(self) -> list[str]:
        """Keys of every published entry (unverified)."""
        return sorted(p.name for p in (self.root / "entries").glob("*/*") if p.is_dir())
