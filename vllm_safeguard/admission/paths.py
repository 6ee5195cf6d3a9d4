"""Root containment for adapter paths that arrive in requests (``/v1/load_lora_adapter``'s ``lora_path``).

A request may only name an adapter folder *inside* one of the configured adapter roots. Names are
resolved with ``realpath`` (every ``..`` and symlink followed) and then compared with each resolved
root using ``commonpath``, so ``../``, absolute names and symlinks pointing out of a root are all
refused the same way. The returned path is the resolved one: open that, not the request's string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import AdapterValidationError

logger = logging.getLogger("vllm_safeguard")

MAX_PATH_CHARS = 4096


def _inside(real: str, root: str) -> bool:
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives (Windows) or a mix of absolute and relative paths
        return False


def contained_path(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]]) -> Path:
    """Resolve a requested adapter path and refuse it unless it lies strictly inside one of ``roots``.

    Args:
        path: the name from the request; relative names are taken relative to each root in turn
            (the first root where it exists wins) and must stay inside every root they are joined to;
            absolute names must resolve inside a root.
        roots: the configured adapter roots (resolved with ``realpath`` too).

    Returns:
        The resolved path (it may not exist; the loader refuses missing folders itself).

    Raises:
        AdapterValidationError: no roots configured, an empty / over-long / NUL-holding name, a
            name that resolves to a root itself, or one that escapes every root.
    """
    if not roots:
        raise AdapterValidationError("no adapter roots are configured: every adapter path is refused")
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterValidationError("adapter path must be a string", value=path)
    name = os.fspath(path)
    if not isinstance(name, str) or not name.strip():
        raise AdapterValidationError("adapter path is empty", value=name)
    if len(name) > MAX_PATH_CHARS:
        raise AdapterValidationError(
            f"adapter path longer than {MAX_PATH_CHARS} characters", value=f"<{len(name)} chars>"
        )
    if "\0" in name:
        raise AdapterValidationError("adapter path holds a NUL byte", value=name)
    real_roots = [os.path.realpath(os.fspath(r)) for r in roots]
    if os.path.isabs(name):
        candidates = [os.path.realpath(name)]
    else:
        candidates = [os.path.realpath(os.path.join(root, name)) for root in real_roots]
    if os.path.isabs(name):
        inside = [c for c in candidates if any(_inside(c, r) for r in real_roots)]
    else:
        # A relative name must stay inside *every* root it is joined to: a name that escapes one root
        # (a symlink out of it, or '..') is refused even if it would land, e.g. as a missing folder,
        # inside another root.
        inside = candidates if all(_inside(c, r) for c, r in zip(candidates, real_roots, strict=True)) else []
    if not inside:
        raise AdapterValidationError(
            "adapter path escapes the allowed adapter roots", file=name, value=candidates[0]
        )
    if any(c in real_roots for c in inside):
        raise AdapterValidationError(
            "adapter path names an adapter root itself, not a folder in it", file=name
        )
    for c in inside:
        if os.path.lexists(c):
            return Path(c)
    return Path(inside[0])


def resolve_adapter_path(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]]) -> str | None:
    """What the plugin does with every adapter path it handles (the load hook and the API server).

    With ``roots`` configured: the contained, resolved folder (see :func:`contained_path`), or
    :class:`AdapterValidationError`. Without roots: None, meaning "no restriction configured; resolve
    the path the way vLLM does" (absolute, ``~``, relative to the working directory, or a hub id).
    """
    if not roots:
        return None
    return str(contained_path(path, roots))


def warn_if_unrestricted(roots: Sequence[object], env: Mapping[str, str] | None = None) -> bool:
    """Log a warning (once per call site) when runtime loading is on and no adapter roots are set.

    Returns True when it warned.
    """
    env = os.environ if env is None else env
    runtime = env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true", "yes")
    if roots or not runtime:
        return False
    logger.warning(
        "vllm-safeguard: VLLM_ALLOW_RUNTIME_LORA_UPDATING is on and no adapter_roots are configured: "
        "/v1/load_lora_adapter may name any folder this server can read (or a hub id to download). "
        "Set SAFEGUARD_ADAPTER_ROOTS to the folders adapters may come from."
    )
    return True
