"""A short, time-boxed fuzz run of the adapter parser: only AdapterValidationError may escape.

Longer runs: ``python -m tests.adversarial.fuzz_adapter_parser --seconds 600`` (atheris if installed).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial import fuzz_adapter_parser as fz
from vllm_safeguard.core.adapter_io import load_adapter

# ~6 s of hypothesis (coverage of the decoder's branches, shrinking on failure) plus 12 s of seeded
# random inputs, on 2 CPU cores.
HYPOTHESIS_EXAMPLES = 1200
RANDOM_SECONDS = 12.0


def test_seed_adapter_is_valid() -> None:
    """The adapter every fuzz input mutates must itself load (else nothing deep is reached)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg, header, data = fz.seed_parts()
        fz.write_case(folder, json.dumps(cfg).encode(), fz.weights_bytes(header, data))
        adapter = load_adapter(folder, base_shapes=fz.BASE_SHAPES)
        assert set(adapter.modules) == set(fz.SEED_MODULES)


def test_fuzz_hypothesis() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        outcomes = {"accepted": 0, "refused": 0}

        @settings(
            max_examples=HYPOTHESIS_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.binary(min_size=1, max_size=96))
        def one(data: bytes) -> None:
            outcomes["accepted" if fz.run_one(data, folder) else "refused"] += 1

        one()
        # the harness must reach both outcomes: it is neither all-garbage nor all-valid
        assert outcomes["refused"] > 0 and outcomes["accepted"] > 0, outcomes


def test_fuzz_random_timeboxed() -> None:
    t0 = time.monotonic()
    execs, accepted, crashes = fz.fuzz_random(RANDOM_SECONDS, seed=12345)
    elapsed = time.monotonic() - t0
    print(f"fuzz: {execs} executions in {elapsed:.1f} s, {accepted} accepted, {len(crashes)} crashes")
    assert not crashes, f"unexpected exception for input {crashes[0][0].hex()}:\n{crashes[0][1]}"
    assert execs > 100
    assert elapsed < RANDOM_SECONDS + 5
