"""The plan of ``vllm-safeguard prepare``: its stages, their keys (cache) and outputs, and the time estimate."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.adapter_io import load_adapter
from ..core.artifacts import slug
from ..core.model_files import sha256_file
from ..errors import ConfigError
from ..guard.train import GUARD_RECIPE
from .inputs import PrepareInputs
from .options import PrepareOptions

MANIFEST = "manifest.json"
# Seconds per stage for SmolLM2-135M (fp32) on 2 CPU cores, measured (benchmarks/results/
# bench_prepare.md); the estimate scales them by the model's weight bytes. The guard and calibration
# figures are estimates since issue 21 (rephrased pools, held-out-register folds, reworded calibration
# prompts, training states under each probe adapter): the generalization lab's guard stage took 563 s
# (809 training prompts read on the bare model and under 2 adapters); prepare's pools are ~1.3x
# larger, and its calibration sees 3x the prompts (bench_prepare was not rerun).
REFERENCE_BYTES = 538_000_000
STAGE_SECONDS = {
    "probe_adapters": 195.0,
    "reference": 21.0,
    "safety_adapter": 10.0,
    "guard": 730.0,
    "calibration": 90.0,
}


@dataclass
class Stage:
    name: str
    key: str
    output: Path
    needs_base: bool = False
    estimate_s: float = 0.0
    cached: bool = False
    skipped: str = ""  # why it will not run (e.g. no --base)


@dataclass
class Plan:
    model: Path
    base: Path | None
    root: Path  # <out>/<model slug>
    options: PrepareOptions
    inputs: PrepareInputs
    model_hash: str
    stages: list[Stage] = field(default_factory=list)
    # Operator-supplied harmful adapters used instead of training probe adapters (--probe-adapter).
    probe_sources: list[Path] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.root / ".work"

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def describe(self) -> str:
        todo = [s for s in self.stages if not s.cached and not s.skipped]
        lines = [f"prepare {self.model} -> {self.root}"]
        for s in self.stages:
            state = "cached" if s.cached else f"~{duration(s.estimate_s)}"
            lines.append(f"  {s.name:<15} {state:<10} {s.output}")
            if s.skipped:
                lines.append(f"  {'':<15} SKIPPED: {s.skipped}")
        total = sum(s.estimate_s for s in todo)
        lines.append(
            f"estimated time: ~{duration(total)} for {len(todo)} stage(s) "
            "(measured on 2 CPU cores, scaled by the model's weight size; GPUs are faster)"
        )
        return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_hash(files: list[Path]) -> str:
    """sha256 over files' names and contents (a model's weights, an adapter folder)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def weights_hash(model_dir: Path) -> str:
    """sha256 over the model folder's weight files (names and contents)."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors / *.bin weights (is it a HF model folder?)")
    return files_hash(files)


def make_plan(
    model: Path,
    base: Path | None,
    out: Path,
    options: PrepareOptions,
    inputs: PrepareInputs,
    name: str | None = None,
    probe_sources: list[Path] | None = None,
) -> Plan:
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model {str(model)!r} is not a HF model folder (no config.json)")
    if base is not None and not (base / "config.json").is_file():
        raise ConfigError(f"--base {str(base)!r} is not a HF model folder (no config.json)")
    model_hash = weights_hash(model)
    plan = Plan(model, base, out / slug(name or model.name), options, inputs, model_hash)
    for src in probe_sources or []:
        if not (src / "adapter_config.json").is_file():
            raise ConfigError(
                f"--probe-adapter {str(src)!r} is not a PEFT adapter folder (no adapter_config.json)"
            )
    plan.probe_sources = list(probe_sources or [])
    scale = sum(f.stat().st_size for f in model.glob("*.safetensors")) / REFERENCE_BYTES or 1.0
    opts = options.model_dump(mode="json")
    sources = [adapter_hash(p) for p in plan.probe_sources]
    k_probe = _key("probe", model_hash, inputs.digest(), opts, sources)
    k_safety = _key("safety", k_probe)
    k_guard = _key("guard", model_hash, inputs.digest(), opts, GUARD_RECIPE, k_probe)
    base_hash = weights_hash(base) if base is not None else None
    specs = [
        ("probe_adapters", k_probe, plan.work / "probe-adapters", False),
        ("reference", _key("reference", model_hash, base_hash, opts), plan.root / "reference", True),
        ("safety_adapter", k_safety, plan.root / "safety_adapter", False),
        ("guard", k_guard, plan.work / "guard-uncalibrated", False),
        ("calibration", _key("calibration", k_guard, k_safety), plan.root / "guard", False),
    ]
    for stage_name, key, output, needs_base in specs:
        st = Stage(stage_name, key, output, needs_base, STAGE_SECONDS[stage_name] * scale)
        st.cached = _read_key(output) == key
        if needs_base and base is None:
            st.skipped = "needs --base (the unaligned counterpart): load-time repair stays off"
        plan.stages.append(st)
    return plan


def _read_key(folder: Path) -> str | None:
    p = folder / ".prepare-key"
    return p.read_text().strip() if p.is_file() else None


def probe_adapter_dirs(plan: Plan) -> list[Path]:
    root = plan.stage("probe_adapters").output
    if plan.probe_sources:
        return [root / f"operator-{i}" for i in range(len(plan.probe_sources))]
    return [root / f"{d}-unsafe-s{plan.options.probe_seed}" for d in plan.options.probe_domains]


def adapter_hash(folder: Path) -> str:
    """sha256 over a PEFT folder's config and weight files."""
    return files_hash(sorted(folder.glob("adapter_*")))


def load_probes(plan: Plan) -> list[Any]:
    return [load_adapter(p) for p in probe_adapter_dirs(plan)]
