"""The plugin's configuration: one pydantic model, four sources, one precedence order.

Precedence (highest first)::

    vLLM --additional-config '{"safeguard": {...}}'
    SAFEGUARD_<FIELD> environment variables           (e.g. SAFEGUARD_RISK_THRESHOLD=0.2)
    the YAML / TOML file named by SAFEGUARD_CONFIG_FILE (top level, or under a "safeguard" key)
    defaults

Sources are merged field by field (a source that sets ``method_options`` replaces the whole mapping,
so a file's options never leak into a method chosen on the command line). Our variables never use the
``VLLM_`` prefix: vLLM warns about (or, in strict mode, rejects) ``VLLM_*`` names it does not know.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .methods import METHODS, parse_options

logger = logging.getLogger("vllm_safeguard")

ENV_PREFIX = "SAFEGUARD_"
CONFIG_FILE_ENV = "SAFEGUARD_CONFIG_FILE"
ADDITIONAL_CONFIG_KEY = "safeguard"
# SAFEGUARD_* variables that belong to other parts of the project, not to this model.
_FOREIGN_ENV = {CONFIG_FILE_ENV}


def default_cache_root() -> Path:
    """``$SAFEGUARD_CACHE_DIR`` or ``~/.cache/vllm_safeguard`` (the same root the lab uses)."""
    env = os.environ.get("SAFEGUARD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm_safeguard"


class SafeguardConfig(BaseModel):
    """Everything the plugin reads. Every field can come from any of the four sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Inspect and repair every adapter vLLM loads. False leaves vLLM's loading untouched.",
    )
    method: str = Field(
        "safegene",
        description=(
            f"Repair method applied to adapters at or above the risk threshold: one of {tuple(METHODS)}. "
            "Default 'safegene', the load-time half of the measured default policy (README 'What the "
            "default does'); it needs the artifacts `vllm-safeguard prepare` builds."
        ),
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the chosen method (validated by the method's own Options model).",
    )
    risk_threshold: float = Field(
        0.15,
        ge=0.0,
        description=(
            "Adapters whose risk score (worst module, see vllm_safeguard.core.risk: 1 = cancels that module's "
            "alignment delta exactly, unbounded above) is below this pass (canonicalized, unrepaired); at or "
            "above it the method must bring the score below it (and below max_served_risk), else the "
            "adapter is refused (refused_unrepairable). 0 runs the method on every adapter. Default 0.15: "
            "on SmolLM2 unsafe experts made like the lab's score 0.14-0.19 (safegene brings those above 0.15 "
            "to 0.11-0.13) and benign adapters 0.07-0.10, which safegene would refuse at 0 (adding the "
            "safety adapter raises their small risk); README 'What the default does'."
        ),
    )
    fail_closed: bool = Field(
        True,
        description=(
            "Refuse an adapter whose processing fails (artifacts, timeouts, internal errors: the client gets "
            "a 4xx). False serves such an adapter unrepaired through vLLM's own loader instead, with an error "
            "in the log (not recommended). Decisions are never overridden: an adapter refused as invalid, "
            "uncovered or unrepairable is refused either way."
        ),
    )
    reference_path: Path | None = Field(
        None,
        description="Alignment reference folder (AlignmentReference.save) for the served base model.",
    )
    safety_adapter_path: Path | None = Field(
        None,
        description="SafeGene safety adapter folder (needed by method 'safegene').",
    )
    artifacts_dir: Path | None = Field(
        default_factory=lambda: default_cache_root() / "artifacts",
        description=(
            "Where to look for per-model artifacts when the explicit paths are unset: "
            "<artifacts_dir>/<model slug>/{reference,safety_adapter,guard,translator} (what `vllm-safeguard "
            "prepare` writes; default <cache root>/artifacts, prepare's default --out). The model folder's "
            "own safeguard/<kind> is always tried last."
        ),
    )
    cache_dir: Path = Field(
        default_factory=default_cache_root,
        description="Root of the private repair cache (repaired adapters live in <cache_dir>/repairs).",
    )
    cache_enabled: bool = Field(
        True,
        description="Reuse repairs across loads and processes (content-addressed). False recomputes every load.",
    )
    max_rank: int | None = Field(
        None,
        ge=1,
        description="Upper bound on the repaired adapter's rank. Default: vLLM's --max-lora-rank.",
    )
    max_adapter_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="Largest adapter (sum of tensor bytes) accepted; larger ones are refused.",
    )
    max_served_risk: float | None = Field(
        0.5,
        gt=0,
        description=(
            "No adapter is served at or above this risk, whatever the threshold: with risk_threshold 0 "
            "(repair every adapter) it is the limit a repair must get below, else the adapter is refused "
            "(refused_unrepairable). 0.5 = half of some module's alignment delta undone. None disables it "
            "(then with threshold 0 any result of the method is served)."
        ),
    )
    coverage: Literal["refuse", "strip"] = Field(
        "refuse",
        description=(
            "What to do with an adapter module the alignment reference does not cover (lm_head, "
            "embed_tokens, anything unknown) and coverage_allow does not name: 'refuse' (default) refuses the "
            "adapter with a 400 naming the module; 'strip' removes such modules (logged, counted in "
            "safeguard_modules_stripped_total) and serves the rest. Nothing is served that nothing scored."
        ),
    )
    coverage_allow: list[str] = Field(
        default_factory=list,
        description=(
            "Operator allow-list of uncovered module paths (fnmatch globs, e.g. 'lm_head') that may be served "
            "without a risk score. They are still canonicalized and bounded by max_update_ratio. Embedding "
            "modules (embed_tokens) are never allowed: vLLM reads their LoRA in another layout."
        ),
    )
    max_update_ratio: float | None = Field(
        100.0,
        gt=0,
        description=(
            "Largest ||B A||_F / ||W||_F of any adapted module (W: the base weight it changes). Real LoRA "
            "updates are far below 1; this refuses absurd updates (e.g. ~1e30 factors that fit fp32 but "
            "serve NaN). None disables the bound. Needs the model folder (skipped with a warning without it)."
        ),
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description=(
            "Folders every adapter path must lie inside (after realpath: '..' and symlinks followed). When "
            "set, any adapter outside them is refused: runtime loads, --lora-modules and resolvers alike; "
            "relative names are looked up inside the roots, absolute names must resolve inside one, and hub "
            "ids are never downloaded. Empty (default): no path restriction (vLLM's own behaviour), and a "
            "warning is logged when VLLM_ALLOW_RUNTIME_LORA_UPDATING is on. Env: SAFEGUARD_ADAPTER_ROOTS, "
            "separated by ':' (os.pathsep)."
        ),
    )
    repair_timeout_s: float | None = Field(
        120.0,
        gt=0,
        description=(
            "Wall-clock limit of one adapter's repair (risk scoring + method). Past it the adapter is refused "
            "(4xx). Python cannot kill the thread doing the repair: it runs on in the background until it "
            "returns and its result is discarded; while 2 such threads are still running every new repair is "
            "refused at once. None (env: empty) disables the limit."
        ),
    )
    admission_frontend: bool = Field(
        True,
        description=(
            "Admit adapters in the API server, before the engine sees them (runtime loads, resolvers, "
            "--lora-modules): the engine is handed the admitted cache entry and only verifies it, so a repair "
            "never stalls the engine loop. The worker admits itself when the API server cannot (offline LLM, "
            "no published worker context, or a context that keys adapters differently: logged). False: every "
            "admission runs in the worker, inside the engine loop."
        ),
    )
    admission_workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Admission workers (threads, or child processes with admission_process) per API-server process "
            "(admission_frontend). Repairs are CPU-bound torch work: more workers help only with idle cores."
        ),
    )
    admission_queue: int = Field(
        8,
        ge=0,
        le=10_000,
        description=(
            "Admissions that may wait for a free admission worker, per API-server process. A load beyond "
            "admission_workers + admission_queue is refused at once with HTTP 503 (nothing is read; retry "
            "later) instead of waiting unboundedly."
        ),
    )
    admission_process: bool = Field(
        False,
        description=(
            "Run the API server's admissions in child processes it owns (admission_workers of them, spawned "
            "on first use) instead of threads: a repair's Python work then never holds the API server's "
            "interpreter lock. Measured on 2 busy cores (bench_stall, 12 window pairs): the same p99 "
            "inter-token gap as threads (1.10x vs 1.14x of quiet) with admissions ~2.5x slower (p50 5.2 s "
            "vs 2.1 s), so threads are the default. Each child loads its own copy of the reference and "
            "artifacts (memory grows with admission_workers) and dies with the API server."
        ),
    )
    admission_nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "Scheduling niceness (Linux) of the API server's admission workers: admissions are background "
            "work, token generation is not. 0 competes with the engine for the CPU as an equal; 19 yields "
            "almost always (slower admissions)."
        ),
    )
    admission_torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description=(
            "torch intra-op threads of an admission worker (with threads: of the API-server process, which runs "
            "no other torch work): bounds how many cores one admission can take from the engine. 1 keeps the "
            "others for serving."
        ),
    )
    log_reports: bool = Field(True, description="Log each adapter's risk score and repair summary.")
    alpha_enabled: bool | None = Field(
        None,
        description=(
            "None (default): on when a safety adapter is found for the served model (`vllm-safeguard "
            "prepare` builds one), off otherwise. True: required (startup refuses every adapter without "
            "one). False: off. When on: apply the safety adapter (SAFEGUARD_SAFETY_ADAPTER_PATH / artifacts_dir) at serving time on top of "
            "every task adapter, with a per-request strength alpha (vllm_xargs 'safeguard_alpha'): "
            "y = x W + task LoRA + alpha * (x A_s) B_s. Needs a safety adapter covering every LoRA-wrapped "
            "module of its selected layers; not with --fully-sharded-loras or pipeline parallelism."
        ),
    )
    default_alpha: float | Literal["auto"] = Field(
        "auto",
        description=(
            "Alpha of requests that use a task adapter and do not send 'safeguard_alpha'. 'auto' (default): "
            "the guard probe decides per request (alpha_low below its ramp, its calibrated alpha_high at or "
            "above its threshold, in between on the fail-safe ramp) when a guard is found; without a guard "
            "such requests get 0 (the load-time repair alone). A number: that fixed alpha."
        ),
    )
    base_request_alpha: float = Field(
        0.0,
        description=(
            "Alpha of requests on the base model (no task adapter) that do not send 'safeguard_alpha'. "
            "0 by default: the served base model is the aligned one, so adding the safety delta again "
            "would apply it twice. An explicit 'safeguard_alpha' on a base-model request is honoured."
        ),
    )
    alpha_min: float = Field(0.0, description="Smallest 'safeguard_alpha' a request may send (inclusive).")
    alpha_max: float = Field(1.0, description="Largest 'safeguard_alpha' a request may send (inclusive).")
    translator_path: Path | None = Field(
        None,
        description=(
            "NeWTral translator artifact folder (`vllm-safeguard translator train`); needed by method "
            "'translator'. Default lookup: <artifacts_dir>/<model slug>/translator, then <model>/safeguard/translator."
        ),
    )
    guard_path: Path | None = Field(
        None,
        description=(
            "DSA guard probe folder (`vllm-safeguard guard train`). Enables safeguard_alpha='auto': the probe "
            "scores each such request at the end of its prefill and picks the alpha of its decode tokens "
            "from the probe's manifest: alpha_high at or above the threshold (flagged), alpha_low at or below "
            "ramp_low, linear in logit(score) in between (the fail-safe ramp; no ramp_low: two levels). "
            "Needs alpha on. Default "
            "lookup: <artifacts_dir>/<model slug>/guard, then <model>/safeguard/guard."
        ),
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:  # the registry (vllm_safeguard.methods), so registered methods are accepted
            raise ValueError(f"unknown method {v!r}; choose one of {list(METHODS)}")
        return v

    @field_validator("default_alpha", "base_request_alpha", "alpha_min", "alpha_max")
    @classmethod
    def _finite(cls, v: float | str) -> float | str:
        if isinstance(v, str):  # only default_alpha's Literal["auto"] gets here
            return v
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return v

    @model_validator(mode="after")
    def _alpha_range(self) -> SafeguardConfig:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min {self.alpha_min} > alpha_max {self.alpha_max}")
        for name in ("default_alpha", "base_request_alpha"):
            v = getattr(self, name)
            if isinstance(v, str):
                continue
            if not self.alpha_min <= v <= self.alpha_max:
                raise ValueError(
                    f"{name} {v} lies outside [alpha_min, alpha_max] = [{self.alpha_min}, {self.alpha_max}]"
                )
        if self.guard_path is not None and self.alpha_enabled is False:
            raise ValueError(
                f"guard_path {str(self.guard_path)!r} needs alpha_enabled=true (the guard sets alpha)"
            )
        return self

    @field_validator("method_options")
    @classmethod
    def _options_fit_method(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Refused here, at startup, rather than at every adapter load (each would be refused).
        method = info.data.get("method")
        if method is not None:  # else 'method' itself failed and is reported
            try:
                parse_options(method, v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("adapter_roots")
    @classmethod
    def _expand_roots(cls, v: list[Path]) -> list[Path]:
        out = [Path(os.path.expandvars(str(p))).expanduser() for p in v]
        for p in out:
            if not p.is_absolute():
                raise ValueError(f"adapter root {str(p)!r} must be an absolute path")
        return out

    @field_validator(
        "reference_path", "safety_adapter_path", "artifacts_dir", "cache_dir", "guard_path", "translator_path"
    )
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.expandvars(str(v))).expanduser()

    def method_config(self) -> dict[str, Any]:
        """The part of the config that changes what a repair produces (goes into the cache key)."""
        return {
            "method": self.method,
            "method_options": self.method_options,
            "risk_threshold": self.risk_threshold,
            "max_rank": self.max_rank,
            "coverage": self.coverage,
            "coverage_allow": self.coverage_allow,
            "max_update_ratio": self.max_update_ratio,
            "max_served_risk": self.max_served_risk,
        }

    def summary(self) -> str:
        """One line, for the log."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


# ------------------------------------------------------------------------------------------ sources


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{CONFIG_FILE_ENV}={str(path)!r}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{CONFIG_FILE_ENV}={str(path)!r}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them
        raise ConfigError(f"{path}: cannot parse config file: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must hold a mapping (got {type(data).__name__})")
    # Accept both a dedicated file (fields at top level) and a shared one with a "safeguard" section.
    section = data.get(ADDITIONAL_CONFIG_KEY, data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the 'safeguard' section must be a mapping (got {section!r})")
    return dict(section)


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    fields = SafeguardConfig.model_fields
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _FOREIGN_ENV:
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in fields:
            # Other features of the project own further SAFEGUARD_* variables: not an error here.
            continue
        value: Any = raw
        if field == "method_options":
            try:
                value = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name} must be a JSON object: {e} (got {raw!r})") from e
        elif field == "adapter_roots":
            value = [part for part in raw.split(os.pathsep) if part.strip()]
        elif field == "coverage_allow":
            value = [part.strip() for part in raw.split(",") if part.strip()]
        elif field in ("repair_timeout_s", "max_update_ratio", "max_served_risk"):
            value = None if raw.strip().lower() in ("", "none") else raw
        elif (
            field
            in (
                "max_rank",
                "reference_path",
                "safety_adapter_path",
                "artifacts_dir",
                "guard_path",
                "translator_path",
            )
            and raw == ""
        ):
            value = None
        out[field] = value
    return out


def _from_additional(additional: Mapping[str, Any] | None) -> dict[str, Any]:
    if not additional:
        return {}
    section = additional.get(ADDITIONAL_CONFIG_KEY)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"--additional-config 'safeguard' must be a JSON object (got {section!r})")
    return dict(section)


def load_config(
    additional_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> SafeguardConfig:
    """Merge the four sources (see module docstring) and validate.

    Raises:
        ConfigError: a value is invalid; the message names the field, the source and quotes the value.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    file_name = env.get(CONFIG_FILE_ENV)
    if file_name:
        layers.append((f"file {file_name}", _read_file(Path(file_name).expanduser())))
    layers.append(("environment", _read_env(env)))
    layers.append(("--additional-config", _from_additional(additional_config)))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for k, v in values.items():
            merged[k] = v
            origin[k] = source
    try:
        return SafeguardConfig.model_validate(merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<config>"
            top = str(err["loc"][0]) if err["loc"] else ""
            where = origin.get(top, "defaults")
            if err["type"] == "extra_forbidden":
                msg = f"unknown field {field!r} (from {where}); known fields: {sorted(SafeguardConfig.model_fields)}"
            else:
                msg = f"field {field!r} (from {where}): {err['msg']} (got {err.get('input')!r})"
            problems.append(msg)
        raise ConfigError("invalid safeguard config: " + "; ".join(problems)) from e


_logged: set[str] = set()


def log_effective(config: SafeguardConfig, *, context: str = "") -> None:
    """Log the effective config once per process (per distinct config)."""
    line = config.summary()
    if line in _logged:
        return
    _logged.add(line)
    logger.info("vllm-safeguard effective config%s: %s", f" ({context})" if context else "", line)


def describe_fields() -> list[tuple[str, str, str]]:
    """(field, env var, description) rows: documentation generated from the model itself."""
    return [
        (name, ENV_PREFIX + name.upper(), f.description or "")
        for name, f in SafeguardConfig.model_fields.items()
    ]
