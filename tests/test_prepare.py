"""``vllm-safeguard prepare`` on a tiny random model, and what the plugin then resolves as protection.

The run is real (probe adapters trained, SafeGene extraction, guard probe, alpha calibration by
generation) with tiny budgets; the checks are on the plumbing: outputs where the plugin looks, the
manifest, resumability (keys), and the artifact-dependent defaults (:mod:`vllm_safeguard.protection`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vllm_safeguard.config import load_config
from vllm_safeguard.errors import ConfigError
from vllm_safeguard.prepare.inputs import load_inputs
from vllm_safeguard.prepare.options import PrepareOptions
from vllm_safeguard.prepare.plan import make_plan
from vllm_safeguard.prepare.run import run_plan
from vllm_safeguard.protection import LAYERS, resolve_protection

OPTIONS = PrepareOptions(
    probe_steps=2,
    n_task_train=8,
    n_harm_share=4,
    guard_domain_train=2,
    harmful_tokens=2,
    safety_rank=2,
    reference_max_rank=4,
    alpha_cal_sweep=(1.0, 2.0),
)
FILL = ["how", "to", "make", "a", "the", "please", "explain", "write", "tell", "me"]


def _prompt_file(path: Path, word: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join([*rng.sample(FILL, 4), word, str(i)]) for i in range(n)))
    return path


def _inputs(folder: Path) -> Any:
    """The prompt sets of every test: 32 harmful-word and 24 benign-word prompts in ``folder``."""
    return load_inputs(
        OPTIONS, _prompt_file(folder / "h.txt", "bomb", 32, 0), _prompt_file(folder / "b.txt", "cake", 24, 1)
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Path, Path]) -> tuple[Path, dict]:
    base, aligned = tiny_models
    root = tmp_path_factory.mktemp("prepare")
    inputs = _inputs(root)
    plan = make_plan(aligned, base, root / "artifacts", OPTIONS, inputs)
    assert "estimated time" in plan.describe()
    manifest = run_plan(plan, log=lambda _: None)
    return root, manifest


def test_artifacts_land_where_the_plugin_looks(prepared: tuple[Path, dict], tiny_models) -> None:
    root, manifest = prepared
    _, aligned = tiny_models
    folder = root / "artifacts" / aligned.name
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert set(manifest["artifacts"]) == {"reference", "safety_adapter", "guard"}
    cal = manifest["quality"]["alpha_calibration"]
    assert cal["alpha_high"] in (1.0, 2.0) and set(cal["fewshot_asr_by_alpha"]) == {"1", "2"}
    assert manifest["quality"]["guard"]["heldout"]["n_harmful"] == 8  # a quarter of 32, held out
    cfg = load_config({"safeguard": {"artifacts_dir": str(root / "artifacts")}}, env={})
    resolved, protection = resolve_protection(cfg, "served-name", aligned)
    assert protection.layers == dict.fromkeys(LAYERS, True) and not protection.missing
    assert resolved.alpha_enabled is True and resolved.guard_path == folder / "guard"


def test_rerun_is_cached_and_a_changed_option_rebuilds_only_what_depends_on_it(
    prepared: tuple[Path, dict], tiny_models
) -> None:
    root, _ = prepared
    base, aligned = tiny_models
    inputs = _inputs(root)
    again = make_plan(aligned, base, root / "artifacts", OPTIONS, inputs)
    assert all(s.cached for s in again.stages)
    changed = make_plan(
        aligned, base, root / "artifacts", OPTIONS.model_copy(update={"safety_rank": 3}), inputs
    )
    # The option set is hashed whole into each key: every stage is rebuilt (never a stale one reused).
    assert not any(s.cached for s in changed.stages)


def test_without_base_the_reference_is_skipped_and_said(tiny_models, tmp_path: Path) -> None:
    _, aligned = tiny_models
    inputs = _inputs(tmp_path)
    plan = make_plan(aligned, None, tmp_path / "artifacts", OPTIONS, inputs)
    ref = plan.stage("reference")
    assert ref.skipped and "--base" in ref.skipped and "--base" in plan.describe()


def test_bad_inputs_are_refused_with_the_problem(tmp_path: Path) -> None:
    few = _prompt_file(tmp_path / "few.txt", "bomb", 5, 0)
    with pytest.raises(ConfigError, match="5 harmful prompts"):
        load_inputs(OPTIONS, few, None)
    with pytest.raises(ConfigError, match="cannot read prompt file"):
        load_inputs(OPTIONS, tmp_path / "absent.txt", None)
    with pytest.raises(ConfigError, match="5 benign prompts"):
        load_inputs(OPTIONS, _prompt_file(tmp_path / "h.txt", "bomb", 32, 0), few)
    inputs = load_inputs(OPTIONS, tmp_path / "h.txt", _prompt_file(tmp_path / "b.txt", "cake", 24, 1))
    with pytest.raises(ConfigError, match="not a HF model folder"):
        make_plan(tmp_path, None, tmp_path / "out", OPTIONS, inputs)


def test_protection_without_artifacts_names_what_is_missing(tiny_models, tmp_path: Path) -> None:
    _, aligned = tiny_models
    cfg = load_config({"safeguard": {"artifacts_dir": str(tmp_path / "none")}}, env={})
    resolved, protection = resolve_protection(cfg, "m", aligned)
    assert protection.layers == dict.fromkeys(LAYERS, False)
    assert "safety adapter" in protection.missing["load_time_repair"]
    assert "vllm-safeguard prepare" in protection.missing["serving_alpha"]
    assert resolved.alpha_enabled is False and resolved.guard_path is None
    off = load_config({"safeguard": {"enabled": False}}, env={})
    assert resolve_protection(off, "m", aligned)[1].layers == dict.fromkeys(LAYERS, False)


def test_operator_probe_adapters_replace_the_trained_ones(tiny_models, tmp_path: Path) -> None:
    from vllm_safeguard.prepare.plan import probe_adapter_dirs
    from vllm_safeguard.testing.tiny import write_random_adapter

    base, aligned = tiny_models
    inputs = _inputs(tmp_path)
    caught = write_random_adapter(tmp_path / "caught", seed=3)
    trained = make_plan(aligned, base, tmp_path / "a", OPTIONS, inputs)
    given = make_plan(aligned, base, tmp_path / "a", OPTIONS, inputs, probe_sources=[caught])
    assert given.stage("probe_adapters").key != trained.stage("probe_adapters").key
    assert [p.name for p in probe_adapter_dirs(given)] == ["operator-0"]
    with pytest.raises(ConfigError, match="not a PEFT adapter folder"):
        make_plan(aligned, base, tmp_path / "a", OPTIONS, inputs, probe_sources=[tmp_path])
