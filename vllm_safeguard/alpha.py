"""Per-request safety strength ``safeguard_alpha``: parsing, entry-point validation, per-request table.

Request side (API server / offline ``LLM`` front end):

* OpenAI: ``{"vllm_xargs": {"safeguard_alpha": 0.5}}`` (``extra_body`` in the openai client);
  offline: ``SamplingParams(extra_args={"safeguard_alpha": 0.5})``. Both end up in
  ``SamplingParams.extra_args``.
* :class:`~vllm_safeguard.integration.alpha_validator.SafeguardAlphaValidator` is a
  ``vllm.logits_processors`` entry point. vLLM calls its
  ``validate_params`` at admission, so a bad value is an HTTP 400 (``VLLMValidationError``) naming the
  field and the allowed range, and the server keeps serving. As a logits processor it does nothing.
* ``"auto"`` is reserved for the DSA guard (decide alpha from a guard score computed at prefill). It is
  rejected with a clear message until a guard is configured (:data:`AUTO_AVAILABLE`).

Config visible to the validator: ``validate_params`` gets no ``vllm_config``. The environment
(``SAFEGUARD_*``) and ``SAFEGUARD_CONFIG_FILE`` are visible in every process; ``--additional-config``
is recorded by the ``input_processor_init`` patch (``InputProcessor.__init__`` runs in the front-end
process with the real ``vllm_config``) through :func:`set_frontend_additional_config`, so all four
sources apply to the validator as they do to the worker.

Worker side: :func:`resolve_request_alpha` turns a request's ``extra_args`` into a float, and
:class:`AlphaTable` holds per-request overrides that win over ``extra_args`` (the guard will write the
alpha it decides for a request's decode tokens there).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .config import SafeguardConfig

logger = logging.getLogger("vllm_safeguard")

ALPHA_KEY = "safeguard_alpha"
AUTO = "auto"
# Set to True by the guard issue once a guard probe can decide alpha; until then "auto" is refused.
AUTO_AVAILABLE = False


class AlphaValueError(ValueError):
    """A request's ``safeguard_alpha`` is invalid (becomes an HTTP 400 at the entry point)."""


@dataclass(frozen=True)
class AlphaPolicy:
    """What the config says about per-request alpha (a small, hashable view of SafeguardConfig)."""

    enabled: bool = False
    default: float = 1.0
    base_default: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    auto_available: bool = False
    # Requests with a task adapter and no 'safeguard_alpha' are scored by the guard ("auto" default).
    default_auto: bool = False

    @classmethod
    def from_config(cls, config: SafeguardConfig) -> AlphaPolicy:
        auto_default = config.default_alpha == AUTO
        return cls(
            enabled=bool(config.enabled and config.alpha_enabled),
            # "auto" by default: until (and unless) the guard decides, such a request gets 0.
            default=0.0 if auto_default else float(config.default_alpha),
            default_auto=auto_default and config.guard_path is not None,
            base_default=float(config.base_request_alpha),
            lo=float(config.alpha_min),
            hi=float(config.alpha_max),
            # "auto" needs the DSA guard probe (vllm_safeguard.guard), configured by guard_path.
            auto_available=AUTO_AVAILABLE or config.guard_path is not None,
        )

    @property
    def range_text(self) -> str:
        return f"a number in [{self.lo:g}, {self.hi:g}]"


def parse_alpha(value: Any, policy: AlphaPolicy) -> float | Literal["auto"]:
    """Validate one ``safeguard_alpha`` value; return it as a float, or ``"auto"``.

    Numbers only (JSON int or float; ``bool`` is refused although Python treats it as an int), finite,
    inside ``[alpha_min, alpha_max]``: out-of-range values are errors, never clamped. Strings other
    than ``"auto"`` are refused too (no silent coercion of ``"0.5"``).

    Raises:
        AlphaValueError: the message names the field and the allowed range.
    """
    where = f"'{ALPHA_KEY}' must be {policy.range_text}"
    if not policy.enabled:
        raise AlphaValueError(
            f"'{ALPHA_KEY}' is not available on this server (vllm-safeguard alpha_enabled is off); "
            "remove it from the request"
        )
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            if not policy.auto_available:
                raise AlphaValueError(
                    f"'{ALPHA_KEY}'='auto' needs the DSA guard probe, which is not configured on this "
                    f"server; send {policy.range_text} instead"
                )
            return "auto"
        raise AlphaValueError(f"{where} (or 'auto'), got the string {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlphaValueError(f"{where}, got {type(value).__name__} {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise AlphaValueError(f"{where}, got {value!r}")
    if not policy.lo <= f <= policy.hi:
        raise AlphaValueError(f"{where}, got {value!r}")
    return f


RETURN_SCORE_KEY = "safeguard_return_score"


def validate_extra_args(extra_args: Mapping[str, Any] | None, policy: AlphaPolicy) -> None:
    """Raise :class:`AlphaValueError` if ``extra_args`` carries an invalid ``safeguard_alpha`` (or an
    invalid ``safeguard_return_score``, which must be a boolean and needs ``safeguard_alpha='auto'``)."""
    if extra_args and ALPHA_KEY in extra_args:
        parse_alpha(extra_args[ALPHA_KEY], policy)
    if extra_args and RETURN_SCORE_KEY in extra_args:
        flag = extra_args[RETURN_SCORE_KEY]
        # vLLM's OpenAI layer turns JSON true/false into 1/0 inside vllm_xargs before validation.
        if flag not in (True, False, 1, 0) or isinstance(flag, float):
            raise AlphaValueError(f"'{RETURN_SCORE_KEY}' must be true or false, got {flag!r}")
        if flag and str(extra_args.get(ALPHA_KEY, "")).strip().lower() != AUTO:
            raise AlphaValueError(
                f"'{RETURN_SCORE_KEY}' needs '{ALPHA_KEY}'='auto' (only auto requests are scored)"
            )


def wants_score(extra_args: Mapping[str, Any] | None) -> bool:
    """True if a request asked for its guard score back (JSON true arrives as 1, see above)."""
    flag = extra_args.get(RETURN_SCORE_KEY) if extra_args else None
    return flag is not None and not isinstance(flag, float) and flag in (True, 1)


def wants_auto(extra_args: Mapping[str, Any] | None, *, by_default: bool = False) -> bool:
    """True if a request asked for the guard to choose its alpha, or sent no alpha and ``by_default``
    (a task-adapter request on a server whose ``default_alpha`` is "auto")."""
    if by_default and (not extra_args or ALPHA_KEY not in extra_args):
        return True
    value = extra_args.get(ALPHA_KEY) if extra_args else None
    return isinstance(value, str) and value.strip().lower() == AUTO


def resolve_request_alpha(
    extra_args: Mapping[str, Any] | None, policy: AlphaPolicy, *, has_task_adapter: bool
) -> float:
    """The alpha a request's tokens get in the worker.

    Semantics:
        not sent            -> policy.default if has_task_adapter else policy.base_default
        a valid number      -> that number
        "auto"              -> the default above (the guard overrides it through AlphaTable)
        invalid (only possible when the entry-point validator is not installed) -> the default, with
                               an error in the log: the worker cannot answer the client any more.
    """
    default = policy.default if has_task_adapter else policy.base_default
    if not extra_args or ALPHA_KEY not in extra_args:
        return default
    try:
        v = parse_alpha(extra_args[ALPHA_KEY], policy)
    except AlphaValueError as e:
        _log_once(f"vllm-safeguard: invalid {ALPHA_KEY} reached the worker ({e}); using {default}")
        return default
    return default if v == AUTO else float(v)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged and len(_logged) < 64:
        _logged.add(msg)
        logger.error("%s", msg)


class AlphaTable:
    """Per-request alpha overrides, keyed by vLLM request id (thread-safe, worker-local).

    The guard ("auto" mode) writes the alpha it decides for a request here (e.g. after prefill); the
    worker's per-step fill reads it before ``extra_args``. Entries of requests that left the runner are
    dropped by :meth:`prune`.
    """

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def set(self, req_id: str, alpha: float) -> None:
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        with self._lock:
            self._values[req_id] = float(alpha)

    def get(self, req_id: str) -> float | None:
        return self._values.get(req_id)

    def discard(self, req_id: str) -> None:
        with self._lock:
            self._values.pop(req_id, None)

    def prune(self, live: Any) -> None:
        """Keep only the ids in ``live`` (any container supporting ``in``)."""
        if not self._values:
            return
        with self._lock:
            for rid in [r for r in self._values if r not in live]:
                del self._values[rid]

    def __len__(self) -> int:
        return len(self._values)

    def __bool__(self) -> bool:  # an empty table must still be "a table", but cheap to test
        return bool(self._values)


# ------------------------------------------------------------------------------------ front end

_frontend_lock = threading.Lock()
_frontend_additional: Mapping[str, Any] | None = None
_frontend_model: tuple[str, Path | None] | None = None
_policy_cache: tuple[Any, AlphaPolicy] | None = None


def set_frontend_additional_config(
    additional: Mapping[str, Any] | None, model: tuple[str, Path | None] | None = None
) -> None:
    """Record vLLM's ``--additional-config`` and the served model ``(name, folder)`` for the validator
    (called by the input-processor patch): the model decides the artifact-dependent defaults
    (:func:`vllm_safeguard.protection.resolve_protection`) exactly as in the worker."""
    global _frontend_additional, _frontend_model, _policy_cache
    with _frontend_lock:
        _frontend_additional = dict(additional) if additional else None
        _frontend_model = model
        _policy_cache = None


def frontend_policy() -> AlphaPolicy:
    """The alpha policy of this (front-end) process, from all config sources; cached.

    An invalid config yields a disabled policy (requests naming ``safeguard_alpha`` get a 400 saying
    so); the worker logs the config error itself.
    """
    global _policy_cache
    cached = _policy_cache
    if cached is not None:
        return cached[1]
    from .config import load_config
    from .errors import ConfigError

    with _frontend_lock:
        try:
            config = load_config(_frontend_additional)
            if _frontend_model is not None:
                from .protection import resolve_protection

                config = resolve_protection(config, *_frontend_model)[0]
            policy = AlphaPolicy.from_config(config)
        except ConfigError as e:
            logger.error("vllm-safeguard: invalid config, per-request alpha disabled: %s", e)
            policy = AlphaPolicy(enabled=False)
        _policy_cache = (_frontend_additional, policy)
        return policy
