"""Shared fixtures: tiny random Llama models (base, aligned = base + low-rank delta) and a reference."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# Triton picks interpreter vs compiled mode when a kernel is decorated, so the switch must be set
# before any test module imports `kernels` (see tests/kernels/conftest.py). CPU-only machines
# can only run Triton in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The plugin finds per-model artifacts under <artifacts_dir>/<model> (default: the user's cache): every
# test process and the servers it starts look in an empty folder instead, so artifacts an operator (or
# `make demo`) prepared on this machine never change what a test sees.
os.environ.setdefault("SAFEGUARD_ARTIFACTS_DIR", tempfile.mkdtemp(prefix="safeguard-test-artifacts-"))

import pytest

from vllm_safeguard.core.reference import AlignmentReference
from vllm_safeguard.testing.tiny import TinyLlamaSpec, make_tiny_llama, perturb_model


@pytest.fixture(scope="session")
def tiny_spec() -> TinyLlamaSpec:
    return TinyLlamaSpec()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_spec: TinyLlamaSpec) -> tuple[Path, Path]:
    """(base_dir, aligned_dir): the aligned model differs from base by a rank-4 update per module."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_llama(root / "base", tiny_spec, seed=0)
    aligned = perturb_model(base, root / "aligned", seed=1, rank=4, scale=0.05)
    return base, aligned


@pytest.fixture(scope="session")
def tiny_reference(tiny_models: tuple[Path, Path]) -> AlignmentReference:
    base, aligned = tiny_models
    return AlignmentReference.build(aligned, base, energy=0.99, max_rank=16, progress=False)
