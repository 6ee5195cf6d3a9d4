"""Which layers of protection a server really has, and the defaults that depend on its artifacts.

Safe by default means the config's defaults turn protection on as soon as the artifacts
``vllm-safeguard prepare`` builds are present, and that a server without them says so loudly (log at
startup and the ``safeguard_protection`` gauge) instead of quietly running without them.

Semantics (``found(kind)``: a candidate folder of :func:`vllm_safeguard.core.artifacts.candidates` exists)::

    alpha_enabled = config.alpha_enabled            if set (True / False)
                  = found(safety_adapter)           if None (the default)
    guard_path    = config.guard_path               if set
                  = first existing guard candidate  if alpha is on, else None
    layers        = {load_time_repair: enabled and found(reference) and found(each artifact of method),
                     serving_alpha:    enabled and alpha on and found(safety_adapter),
                     guard_auto:       serving_alpha and guard_path is not None}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core.artifacts import ArtifactKind, candidates

if TYPE_CHECKING:
    from .config import SafeguardConfig

logger = logging.getLogger("vllm_safeguard")

LAYERS = ("load_time_repair", "serving_alpha", "guard_auto")
DISABLED = "vllm-safeguard is disabled (enabled=false)"


@dataclass(frozen=True)
class Protection:
    """The resolved layers (name -> active) and, for each missing one, why."""

    layers: dict[str, bool]
    missing: dict[str, str] = field(default_factory=dict)
    loaded: dict[str, Path] = field(default_factory=dict)  # artifact kind -> the folder found

    @property
    def active(self) -> list[str]:
        return [k for k in LAYERS if self.layers.get(k)]

    def summary(self) -> str:
        on = ", ".join(self.active) or "none"
        off = "; ".join(f"{k}: {v}" for k, v in self.missing.items())
        found = ", ".join(f"{k} {v}" for k, v in self.loaded.items())
        return (
            f"protection layers active: {on}"
            + (f"; artifacts: {found}" if found else "")
            + (f" (missing: {off})" if off else "")
        )


def found(
    kind: ArtifactKind, config: SafeguardConfig, model_name: str, model_dir: Path | None
) -> Path | None:
    """The folder :func:`~vllm_safeguard.core.artifacts.locate` would load (None: none exists)."""
    return next((c for c in candidates(kind, config, model_name, model_dir) if c.is_dir()), None)


def _where(kind: ArtifactKind, config: SafeguardConfig, model_name: str, model_dir: Path | None) -> str:
    tried = [str(p) for p in candidates(kind, config, model_name, model_dir)] or ["nothing"]
    return f"missing {kind.what} (tried {', '.join(tried)}; build it with {kind.how})"


def resolve_protection(
    config: SafeguardConfig, model_name: str, model_dir: Path | None
) -> tuple[SafeguardConfig, Protection]:
    """``(config with the artifact-dependent defaults filled in, the protection it gives)``."""
    from .core.reference import REFERENCE
    from .guard.probe import GUARD
    from .methods import METHODS
    from .methods.safegene.safety_adapter import SAFETY_ADAPTER

    missing: dict[str, str] = {}
    safety = found(SAFETY_ADAPTER, config, model_name, model_dir)
    alpha_on = bool(safety) if config.alpha_enabled is None else bool(config.alpha_enabled)
    guard_path = config.guard_path
    if guard_path is None and alpha_on:
        guard_path = found(GUARD, config, model_name, model_dir)
    resolved = config.model_copy(update={"alpha_enabled": alpha_on, "guard_path": guard_path})
    if not config.enabled:
        return resolved, Protection(dict.fromkeys(LAYERS, False), dict.fromkeys(LAYERS, DISABLED))

    needs = [REFERENCE, *METHODS[config.method].artifacts]
    loaded = {k.name: p for k in needs if (p := found(k, config, model_name, model_dir)) is not None}
    if safety is not None and alpha_on:
        loaded[SAFETY_ADAPTER.name] = safety
    if guard_path is not None and alpha_on:
        loaded[GUARD.name] = guard_path
    absent = [k for k in needs if k.name not in loaded]
    if absent:
        missing["load_time_repair"] = f"method {config.method!r}: " + "; ".join(
            _where(k, config, model_name, model_dir) for k in absent
        )
    if not alpha_on:
        missing["serving_alpha"] = (
            "alpha_enabled=false"
            if config.alpha_enabled is False
            else _where(SAFETY_ADAPTER, config, model_name, model_dir)
        )
    elif safety is None:
        missing["serving_alpha"] = _where(SAFETY_ADAPTER, config, model_name, model_dir)
    if "serving_alpha" in missing:
        missing["guard_auto"] = "needs serving_alpha"
    elif guard_path is None:
        missing["guard_auto"] = _where(GUARD, config, model_name, model_dir)
    layers = {k: k not in missing for k in LAYERS}
    return resolved, Protection(layers, missing, loaded)


def log_protection(protection: Protection, model_name: str) -> None:
    """One INFO line when every layer is on; a loud WARNING naming each missing one otherwise."""
    if not protection.missing or set(protection.missing.values()) == {DISABLED}:
        # All on, or switched off on purpose (enabled=false): nothing to shout about.
        logger.info("vllm-safeguard: model %s: %s", model_name, protection.summary())
        return
    bar = "!" * 78
    lines = [bar, f"vllm-safeguard: model {model_name} is NOT fully protected"]
    lines += [f"  {k}: OFF - {v}" for k, v in protection.missing.items()]
    if "load_time_repair" in protection.missing:
        lines.append(
            "  adapters needing the load-time repair are refused (fail_closed=true, the default) or served "
            "unrepaired (fail_closed=false) until it is built"
        )
    lines.append(f"  fix: vllm-safeguard prepare --model <model folder> [--base <base folder>]\n{bar}")
    logger.warning("\n".join(lines))
