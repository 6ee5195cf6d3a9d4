"""The ``vllm.logits_processors`` entry point that validates ``safeguard_alpha`` at admission.

vLLM calls :meth:`SafeguardAlphaValidator.validate_params` when a request arrives, so a bad value is
an HTTP 400 (``VLLMValidationError``) naming the field and the allowed range (the rules:
:func:`vllm_safeguard.alpha.validate_extra_args`), and the server keeps serving. As a logits
processor it does nothing.
"""

from __future__ import annotations

from typing import Any

from ..alpha import ALPHA_KEY, frontend_policy, validate_extra_args


def _validator_bases() -> tuple[type, ...]:
    """vLLM's V1 LogitsProcessor and, when present, the V2 runner's (whose loader refuses V1-only
    plugins at startup). Empty without vLLM: the parser above stays usable in vLLM-free tests."""
    bases: list[type] = []
    try:
        from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1

        bases.append(V1)
    except ImportError:
        pass
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2

        bases.append(V2)
    except ImportError:
        pass
    return tuple(bases) or (object,)


class SafeguardAlphaValidator(*_validator_bases()):  # type: ignore[misc]
    """``vllm.logits_processors`` entry point: validates ``safeguard_alpha`` at admission; a no-op
    logits processor otherwise (argmax invariant, never touches logits)."""

    def __init__(self, vllm_config: Any = None, *args: Any, **kwargs: Any) -> None:
        pass  # stateless: the worker reads alpha in the LoRA path, not here

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None)
        if not extra or ALPHA_KEY not in extra:
            return
        validate_extra_args(extra, frontend_policy())

    # V1 interface
    def apply(self, logits: Any, *args: Any) -> Any:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None

    # V2 interface
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return False  # modifies no request's logits
