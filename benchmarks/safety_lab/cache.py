"""The lab's stage cache: ``$SAFEGUARD_CACHE_DIR/lab/<stage>/<key>``, ``key`` = hash of the inputs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vllm_safeguard.prepare.model_source import cache_dir, sha256_file

# Bump to invalidate every cached stage after a change in how artifacts are produced.
LAB_VERSION = "1"
T0 = time.time()


def log(msg: str) -> None:
    tqdm.write(f"[lab {time.time() - T0:7.1f}s] {msg}")
    sys.stdout.flush()


def key_of(*parts: Any) -> str:
    blob = json.dumps([LAB_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_dir(stage: str, key: str) -> Path:
    return cache_dir() / "lab" / stage / key


def cached_json(stage: str, key: str, build: Callable[[], Any]) -> Any:
    """Load ``stage/key/result.json`` or build and store it."""
    folder = stage_dir(stage, key)
    path = folder / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    value = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
    return value


def cached_dir(stage: str, key: str, build: Callable[[Path], Any]) -> Path:
    """Return ``stage/key/artifact`` (an atomically published folder), building it if absent."""
    folder = stage_dir(stage, key) / "artifact"
    if not folder.exists():
        build(folder)
    return folder


def file_hash(folder: Path) -> str:
    names = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "recipe.json"
    )
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(sha256_file(folder / n).encode())
    return h.hexdigest()[:16]
