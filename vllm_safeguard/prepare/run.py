"""``vllm-safeguard prepare``: build every artifact the plugin uses for one served model.

Semantics (each stage is skipped when its output exists with the same key; keys chain, so a changed
input rebuilds what depends on it and nothing else)::

    probe_adapters  aligned + bundled/operator data -> harmful LoRAs       .work/probe-adapters/<domain>
    reference       aligned - base (needs --base)                           <out>/<model>/reference
    safety_adapter  SafeGene: aligned vs aligned+probes, layers selected    <out>/<model>/safety_adapter
    guard           probe on hidden states, layer by validation AUROC       .work/guard-uncalibrated
    calibration     alpha_high on the few-shot prompts (calibrate.py)       <out>/<model>/guard
    manifest        model hash, artifacts, data, seeds, measured quality    <out>/<model>/manifest.json

The plugin finds ``<out>/<model>/<kind>`` by model (``artifacts_dir``, default ``<cache root>/artifacts``,
which is also ``--out``'s default), so a server started after ``prepare`` is protected with no flag.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.adapter_io import write_folder_atomically
from . import stages as S
from .plan import MANIFEST, Plan, Stage, duration


def _publish(stage: Stage, write: Callable[[Path], object]) -> None:
    """Write a stage's folder atomically, its key last-but-inside (a crash leaves no half folder)."""

    def fill(tmp: Path) -> None:
        write(tmp)
        (tmp / ".prepare-key").write_text(stage.key)

    write_folder_atomically(stage.output, fill)


def run_plan(plan: Plan, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages not cached; write and return the manifest."""
    timings: dict[str, float] = {}
    for st in plan.stages:
        if st.skipped:
            log(f"[prepare] {st.name}: skipped ({st.skipped})")
            continue
        if st.cached:
            log(f"[prepare] {st.name}: cached ({st.output})")
            continue
        log(f"[prepare] {st.name}: building (~{duration(st.estimate_s)})")
        t0 = time.time()
        build: Callable[[Plan, Path], None] = getattr(S, f"build_{st.name}")
        _publish(st, functools.partial(build, plan))
        timings[st.name] = round(time.time() - t0, 1)
        st.cached = True
        log(f"[prepare] {st.name}: done in {timings[st.name]:.0f} s")
    manifest = S.manifest(plan, timings)
    old = plan.root / MANIFEST
    if old.is_file():  # keep the build time of stages reused from an earlier run
        prev = json.loads(old.read_text()).get("timings_s", {})
        manifest["timings_s"] = {**{k: v for k, v in prev.items() if k not in timings}, **timings}
    plan.root.mkdir(parents=True, exist_ok=True)
    tmp = plan.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(plan.root / MANIFEST)
    return manifest


def clean(plan: Plan) -> None:
    """Remove every output of ``plan`` (``--fresh``)."""
    for st in plan.stages:
        shutil.rmtree(st.output, ignore_errors=True)
    (plan.root / MANIFEST).unlink(missing_ok=True)


__all__ = ["clean", "run_plan"]
