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
