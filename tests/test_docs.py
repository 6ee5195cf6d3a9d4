"""Docs for every knob: each config field and its environment variable appear in the README."""

from __future__ import annotations

from pathlib import Path

from vllm_safeguard.config import describe_fields
from vllm_safeguard.metrics import METRIC_NAMES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_field_is_documented() -> None:
    missing = [(f, e) for f, e, _ in describe_fields() if f"`{f}`" not in README or f"`{e}`" not in README]
    assert not missing, f"README lacks config fields: {missing}"


def test_config_table_says_what_the_code_says() -> None:
    """Each field's row carries its current description (the table is not left behind by the code)."""
    stale = [f for f, _, description in describe_fields() if description not in README]
    assert not stale, f"README's config table is stale for: {stale}"


def test_every_metric_is_documented() -> None:
    missing = [m for m in METRIC_NAMES if m not in README]
    assert not missing, f"README lacks metrics: {missing}"


def test_every_method_option_is_documented() -> None:
    from vllm_safeguard.methods import METHODS

    missing = [
        (name, opt)
        for name, method in METHODS.items()
        for opt in method.options.model_fields
        if f"| `{name}` | `{opt}` |" not in README
    ]
    assert not missing, f"README lacks method options: {missing}"
