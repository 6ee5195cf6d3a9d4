"""The ``vllm.general_plugins`` entry point: runs in the API server, the engine core and every worker.

``register()`` must be idempotent (vLLM calls it once per process, tests call it again) and cheap
(it runs before vLLM starts serving): it installs the patches of :mod:`vllm_safeguard.integration.monkey_patch`
(deferred until vLLM imports each target module) and sets the build-info gauge. Everything heavy (the
config, the alignment reference, the cache) is built in the worker when vLLM creates its LoRA manager.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("vllm_safeguard")

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Install the vLLM patches in this process (once).

    Raises:
        PatchContractError: this vLLM does not have what a patch needs, unless the plugin is switched
            off in the environment or config file (``SAFEGUARD_ENABLED=false``): running with half the
            patches could serve adapters without repairing them.
    """
    global _registered
    with _lock:
        if _registered:
            return
        from . import monkey_patch
        from .patching import PatchContractError, vllm_version

        _share_vllm_log_handlers()

        try:
            applied = monkey_patch.install()
        except PatchContractError:
            if _enabled_by_env():
                raise
            logger.warning(
                "vllm-safeguard: patches do not fit this vLLM, and the plugin is disabled; skipping"
            )
            _registered = True
            return
        try:
            from ..metrics import set_build_info

            set_build_info(vllm_version())
        except Exception as e:  # metrics must never stop vLLM from starting
            logger.warning("vllm-safeguard: could not set the build-info metric: %s", e)
        _registered = True
        logger.debug("vllm-safeguard registered (applied now: %s)", applied)


def _share_vllm_log_handlers() -> None:
    """Send our log records where vLLM sends its own (its logging config only covers ``vllm.*``)."""
    ours, theirs = logging.getLogger("vllm_safeguard"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level or logging.INFO)
    ours.propagate = False


def _enabled_by_env() -> bool:
    """``enabled`` from the sources known before vLLM's config exists (env, config file)."""
    from ..config import load_config
    from ..errors import ConfigError

    try:
        return load_config().enabled
    except ConfigError:
        return True  # an invalid config must not turn protection off
