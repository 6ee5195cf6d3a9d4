"""What the two hostile-adapter corpora (:mod:`.attacks`, :mod:`.evasions`) share: registering a named
writer, resetting the folder a corpus is written to, the manifest, and the command line."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def description(fn: Callable[..., Any]) -> str:
    """The first line of ``fn``'s docstring (its name without one): a registered case's description."""
    return (fn.__doc__ or fn.__name__).strip().splitlines()[0]


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty folder (an existing one is removed first)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/manifest.json``; return ``manifest``."""
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def corpus_parser(module: str, doc: str | None, base_model_help: str) -> argparse.ArgumentParser:
    """``python -m MODULE OUT_DIR [--base-model DIR]``, described by the first line of ``doc``."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0] if doc else None)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--base-model", type=Path, default=None, help=base_model_help)
    return ap
