"""Typed errors. Every rejection of untrusted input is an :class:`AdapterValidationError`."""

from __future__ import annotations


class SafeguardError(Exception):
    """Base class of every error this package raises on purpose."""


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AdapterValidationError(SafeguardError):
    """An adapter (or one of its files) was refused. The message names file, key and bad value.

    Attributes:
        problem: what is wrong, in words.
        file: the offending file (or folder), if known.
        key: the tensor name / config field, if the problem is local to one.
        value: the bad value (shortened in the message).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        key: str | None = None,
        value: object = None,
        has_value: bool | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.key = key
        self.value = value
        self.has_value = has_value
        parts = []
        if file is not None:
            parts.append(str(file))
        if key is not None:
            parts.append(f"key {key!r}")
        where = ": ".join(parts)
        msg = f"{where}: {problem}" if where else problem
        if has_value or (has_value is None and value is not None):
            msg += f" (got {_short(value)})"
        super().__init__(msg)


class ReferenceArtifactError(SafeguardError):
    """An alignment reference / safety-vector artifact is missing, corrupt or does not fit the model."""


class RepairError(SafeguardError):
    """A repair method could not produce a valid repaired adapter."""


class ConfigError(SafeguardError):
    """A configuration value is invalid (the message quotes it)."""


class CoverageError(SafeguardError):
    """The adapter touches a module nothing can score (outside the alignment reference and the allow-list)."""


class UnrepairableError(RepairError):
    """The adapter is at or above the risk threshold and the method did not bring it below (fail closed)."""


def relocated(error: AdapterValidationError, staged: str, source: str) -> AdapterValidationError:
    """The same error naming ``source`` instead of the private staging copy it was found in."""
    if not error.file or not error.file.startswith(staged):
        return error
    file = source + error.file[len(staged) :]
    return AdapterValidationError(
        error.problem, file=file, key=error.key, value=error.value, has_value=error.has_value
    )


# ------------------------------------------------------------------------------------------ refusals

# Refusals cross two process boundaries as plain strings (worker -> engine core -> API server), so the
# API-server patch recognises ours by these delimiters and returns the text between them as a 4xx.
REFUSAL_START = "[vllm-safeguard] "
REFUSAL_END = " [/vllm-safeguard]"

# Refusal kinds (the metrics' outcome label is "refused_<kind>").
REFUSAL_KINDS = ("invalid", "uncovered", "unrepairable", "error")
# Not a decision about the adapter: the API server's admission queue is full (a 503; retry later).
OVERLOADED = "overloaded"


def refusal_kind(error: BaseException) -> str:
    """``invalid`` (bad or unbounded input, or what vLLM would refuse), ``uncovered`` (a module nothing
    can score), ``unrepairable`` (risky and not repaired below the threshold), else ``error``."""
    if isinstance(error, AdapterValidationError):
        return "invalid"
    if isinstance(error, CoverageError):
        return "uncovered"
    if isinstance(error, UnrepairableError):
        return "unrepairable"
    return "error"


class AdapterRefused(SafeguardError):
    """An adapter was refused (fail-closed). ``str()`` is delimited for the API-server patch."""

    def __init__(self, adapter_name: str, reason: str, kind: str = "error") -> None:
        self.adapter_name = adapter_name
        self.reason = reason
        self.kind = kind
        super().__init__(f"{REFUSAL_START}adapter {adapter_name!r} refused ({kind}): {reason}{REFUSAL_END}")


def is_overload(text: str) -> bool:
    """Whether a refusal text (:func:`refusal_text`) is an overload, not a decision (-> 503)."""
    return f"refused ({OVERLOADED})" in text


def refusal_text(message: str) -> str | None:
    """Our refusal text inside a (possibly wrapped) error message, or None if it is not ours."""
    start = message.find(REFUSAL_START)
    if start < 0:
        return None
    body = message[start + len(REFUSAL_START) :]
    end = body.find(REFUSAL_END)
    return (body if end < 0 else body[:end]).strip()


class SafetyPathError(SafeguardError):
    """The serving-time safety path cannot start (coverage, TP, unsupported platform or runner)."""
