"""One locator for every per-model artifact (alignment reference, SafeGene safety adapter, translator).

An :class:`ArtifactKind` says how one kind of artifact folder is found, loaded and named in the cache
key; methods declare the kinds they need (:class:`vllm_safeguard.methods.base.Method`), so the
pipeline, the cache key and the serving-time safety path loop over those declarations instead of
branching on method names.

Semantics (first existing folder wins)::

    candidates(kind) = [config.<kind.path_field>]                       if set (explicit, nothing else)
                     = [<artifacts_dir>/<slug(model name)>/<kind.name>,
                        <artifacts_dir>/<slug(model folder name)>/<kind.name>,
                        <model folder>/safeguard/<kind.name>]            otherwise (each only if known)
    locate(kind)     = kind.load(realpath(first candidate that is a folder)), loaded once per process
                       else ReferenceArtifactError naming every folder tried and how to build one
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import ReferenceArtifactError


class ArtifactSources(Protocol):
    """The config fields the locator reads (``SafeguardConfig`` has them)."""

    artifacts_dir: Path | None


@dataclass(frozen=True)
class Loaded:
    """A loaded artifact: ``value`` is what methods receive; ``content_hash`` goes into the cache key."""

    value: Any
    content_hash: str
    # The alignment reference the artifact was built against (None: not recorded); a mismatch refuses it.
    reference_hash: str | None = None


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact folder.

    Attributes:
        name: folder name under ``<artifacts_dir>/<model>/`` and ``<model>/safeguard/``.
        path_field: ``SafeguardConfig`` field with an explicit folder (env ``SAFEGUARD_<FIELD>``).
        load: folder -> :class:`Loaded` (called once per folder and process).
        what: what it is, for error messages ("a SafeGene safety adapter").
        how: how an operator builds one (a CLI command or API call).
    """

    name: str
    path_field: str
    load: Callable[[str], Loaded]
    what: str
    how: str

    @property
    def env(self) -> str:
        return "SAFEGUARD_" + self.path_field.upper()


def slug(name: str) -> str:
    """A model id as one path component (``org/model`` -> ``org--model``)."""
    return name.strip("/").replace("/", "--") or "model"


def candidates(kind: ArtifactKind, config: Any, model_name: str, model_dir: Path | None) -> list[Path]:
    """Where to look for ``kind`` for this model, first match wins (see the module Semantics)."""
    explicit = getattr(config, kind.path_field)
    if explicit is not None:
        return [Path(explicit)]
    out: list[Path] = []
    if config.artifacts_dir is not None:
        out.append(config.artifacts_dir / slug(model_name) / kind.name)
        if model_dir is not None:
            out.append(config.artifacts_dir / slug(model_dir.name) / kind.name)
    if model_dir is not None:
        out.append(model_dir / "safeguard" / kind.name)
    return out


@functools.lru_cache(maxsize=16)
def _load_once(kind: ArtifactKind, folder: str) -> Loaded:
    return kind.load(folder)


def locate(
    kind: ArtifactKind, config: Any, model_name: str, model_dir: Path | None, *, needed_by: str = ""
) -> Loaded:
    """Load (once per process) the ``kind`` artifact of the served model.

    Raises:
        ReferenceArtifactError: no candidate folder exists (the message lists them and says how to
            build one), or loading it failed.
    """
    tried = candidates(kind, config, model_name, model_dir)
    for cand in tried:
        if cand.is_dir():
            return _load_once(kind, str(cand.resolve()))
    who = f"{needed_by} needs" if needed_by else "no"
    raise ReferenceArtifactError(
        f"{who} {kind.what} for model {model_name!r}: tried {[str(p) for p in tried] or 'nothing'}; "
        f"set {kind.env} (or '{kind.path_field}' in the config, or artifacts_dir) to a folder made by "
        f"{kind.how}"
    )
