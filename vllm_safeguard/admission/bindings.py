"""Admission bindings shared between the worker and the API server (plain files, no vLLM import).

The worker binds each admitted adapter ``(lora_name, lora_int_id)`` to its canonical folder and
publishes that here; the API server checks it for every request that names an adapter, so a request
whose adapter's admitted copy has disappeared fails *alone*, with a 400, before the engine sees it
(inside the engine step there is no per-request error path: see ``worker_hook.load_adapter_hook``).

Layout: ``<cache_dir>/bindings/<sha256(model)[:16]>/<sha256(lora name)[:32]>.json`` =
``{"lora_name", "lora_int_id", "path", "key", "instance"}`` (``instance``: vLLM's engine instance id, so
a restarted server, whose int ids start again at 1, never reuses a binding), written atomically. Names
are hashed, never used as paths. The same file lets the tensor-parallel workers of one engine admit an
adapter once (:func:`binding_lock`): each shard then serves the same admitted bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.adapter_io import WEIGHTS_NAME


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def binding_file(cache_dir: Path, model_name: str, lora_name: str) -> Path:
    return Path(cache_dir) / "bindings" / _h(model_name, 16) / f"{_h(lora_name, 32)}.json"


def publish_binding(
    cache_dir: Path,
    model_name: str,
    lora_name: str,
    lora_int_id: int,
    path: Path,
    *,
    key: str = "",
    instance: str = "",
) -> None:
    """Record (atomically) that ``lora_name`` / ``lora_int_id`` of engine ``instance`` is served from ``path``."""
    target = binding_file(cache_dir, model_name, lora_name)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps(
        {
            "lora_name": lora_name,
            "lora_int_id": lora_int_id,
            "path": str(path),
            "key": key,
            "instance": instance,
        }
    )
    fd, tmp = tempfile.mkstemp(prefix=".binding.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_binding(
    cache_dir: Path, model_name: str, lora_name: str, lora_int_id: int, instance: str
) -> dict[str, Any] | None:
    """The published binding of exactly this load (same engine instance, name and int id), or None.

    vLLM's int ids restart at 1 with every server, so a binding of another instance is never used.
    """
    try:
        data = json.loads(binding_file(cache_dir, model_name, lora_name).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("lora_name") != lora_name
        or data.get("lora_int_id") != lora_int_id
        or data.get("instance", "") != instance
    ):
        return None
    return data


@contextmanager
def binding_lock(cache_dir: Path, model_name: str, lora_name: str) -> Iterator[None]:
    """Serialize the admission of one adapter name across processes (the tensor-parallel workers of
    one engine admit once: the first publishes, the others read its binding, never the source)."""
    target = binding_file(cache_dir, model_name, lora_name)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(target.with_suffix(".lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def binding_problem(
    cache_dir: Path, model_name: str, lora_name: str, lora_int_id: int, instance: str = ""
) -> str | None:
    """Why a request for this adapter must fail, or None (admitted copy present, or not ours to judge:
    no binding yet, or one from another load of the same name, which the worker decides)."""
    data = read_binding(cache_dir, model_name, lora_name, lora_int_id, instance)
    if data is None:
        return None
    if not (Path(str(data.get("path"))) / WEIGHTS_NAME).is_file():
        return (
            f"adapter {lora_name!r}: its admitted canonical copy is gone, so it cannot be served; "
            "unload and load the adapter again"
        )
    return None
