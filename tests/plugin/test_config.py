"""Config precedence: --additional-config > SAFEGUARD_* env > SAFEGUARD_CONFIG_FILE > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_safeguard.config import SafeguardConfig, describe_fields, load_config
from vllm_safeguard.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config({}, env={})
    assert cfg == SafeguardConfig()
    assert cfg.method == "safegene" and cfg.fail_closed and cfg.enabled
    # Safe by default: serving-time alpha follows the artifacts, requests default to the guard.
    assert cfg.alpha_enabled is None and cfg.default_alpha == "auto"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_precedence_additional_over_env_over_file(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"sg{suffix}"
    if suffix == ".yaml":
        f.write_text(
            "safeguard:\n  method: nlsr\n  risk_threshold: 0.3\n  max_rank: 4\n  log_reports: false\n"
        )
    else:
        f.write_text('method = "nlsr"\nrisk_threshold = 0.3\nmax_rank = 4\nlog_reports = false\n')
    env = {"SAFEGUARD_CONFIG_FILE": str(f), "SAFEGUARD_RISK_THRESHOLD": "0.2", "SAFEGUARD_MAX_RANK": "6"}
    cfg = load_config({"safeguard": {"max_rank": 8}}, env=env)
    assert cfg.method == "nlsr"  # file only
    assert cfg.log_reports is False  # file only
    assert cfg.risk_threshold == 0.2  # env beats file
    assert cfg.max_rank == 8  # --additional-config beats env and file


def test_env_parsing_and_json_options() -> None:
    env = {
        "SAFEGUARD_ENABLED": "false",
        "SAFEGUARD_METHOD": "safelora_subspace",
        "SAFEGUARD_METHOD_OPTIONS": '{"threshold": 0.5}',
        "SAFEGUARD_REFERENCE_PATH": "~/ref",
        "SAFEGUARD_SOMETHING_ELSE": "x",  # other features' variables are ignored here
        "VLLM_SAFEGUARD_METHOD": "nlsr",  # never our prefix
    }
    cfg = load_config(None, env=env)
    assert cfg.enabled is False
    assert cfg.method_options == {"threshold": 0.5}
    assert cfg.reference_path == Path("~/ref").expanduser()
    assert cfg.method == "safelora_subspace"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"env": {"SAFEGUARD_RISK_THRESHOLD": "lots"}}, "'lots'"),
        ({"env": {"SAFEGUARD_RISK_THRESHOLD": "-0.5"}}, "-0.5"),
        ({"add": {"safeguard": {"method": "magic"}}}, "'magic'"),
        ({"add": {"safeguard": {"bogus_field": 1}}}, "bogus_field"),
        ({"env": {"SAFEGUARD_METHOD_OPTIONS": "{not json"}}, "{not json"),
        ({"add": {"safeguard": "nlsr"}}, "'nlsr'"),
    ],
)
def test_errors_quote_the_bad_value_and_source(source: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(source.get("add"), env=source.get("env", {}))
    assert needle in str(ei.value)


def test_error_names_the_source(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("risk_threshold: -1\n")
    with pytest.raises(ConfigError, match=r"risk_threshold.*from file .*c\.yaml.*got -1"):
        load_config({}, env={"SAFEGUARD_CONFIG_FILE": str(f)})
    with pytest.raises(ConfigError, match="no such file"):
        load_config({}, env={"SAFEGUARD_CONFIG_FILE": str(tmp_path / "missing.yaml")})
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="yaml"):
        load_config({}, env={"SAFEGUARD_CONFIG_FILE": str(tmp_path / "c.ini")})


def test_every_field_is_documented() -> None:
    rows = describe_fields()
    assert {r[0] for r in rows} == set(SafeguardConfig.model_fields)
    for name, env, desc in rows:
        assert env == "SAFEGUARD_" + name.upper() and not env.startswith("VLLM_")
        assert len(desc) > 10, name


def test_method_config_changes_with_options() -> None:
    a = load_config({"safeguard": {"method_options": {"default_coefficient": 0.5}}}, env={})
    b = load_config({"safeguard": {"method_options": {"default_coefficient": 0.7}}}, env={})
    assert a.method_config() != b.method_config()


def test_method_options_are_checked_against_the_method_at_load() -> None:
    """A bad option refuses the config at startup (naming field, source and value), not every adapter."""
    with pytest.raises(
        ConfigError, match=r"(?s)'method_options' \(from environment\).*strength.*'strength': 9"
    ):
        load_config(env={"SAFEGUARD_METHOD": "translator", "SAFEGUARD_METHOD_OPTIONS": '{"strength": 9}'})
    with pytest.raises(ConfigError, match=r"(?s)method_options.*beta"):  # an option of another method
        load_config({"safeguard": {"method": "safelora", "method_options": {"beta": 1.0}}}, env={})
    cfg = load_config(
        env={"SAFEGUARD_METHOD": "translator", "SAFEGUARD_METHOD_OPTIONS": '{"mode": "surgical"}'}
    )
    assert cfg.method_options == {"mode": "surgical"}
