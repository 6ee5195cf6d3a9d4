"""vllm-safeguard: repair third-party LoRA adapters' safety alignment when vLLM loads them."""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """``vllm.general_plugins`` entry point. Runs in every vLLM process; idempotent, cheap."""
    from .integration.plugin import register as _register

    _register()
