"""vllm-safeguard: repair third-party LoRA adapters' safety alignment when vLLM loads them."""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """``vllm.general_plugins`` entry point. Runs in every vLLM process; idempotent, cheap."""
    from .plugin import register as _register

    _register()
