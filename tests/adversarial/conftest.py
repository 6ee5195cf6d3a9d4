"""Fixtures of the adversarial suite: one tiny random Llama, built at test time."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_safeguard.core.model_files import module_shapes_from_model_dir
from vllm_safeguard.testing.tiny import make_tiny_llama


@pytest.fixture(scope="session")
def adv_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (hidden 64, 2 blocks): the base every attack is shaped for."""
    return make_tiny_llama(tmp_path_factory.mktemp("adv_base"), seed=0)


@pytest.fixture(scope="session")
def adv_base_shapes(adv_base_model: Path) -> dict[str, tuple[int, int]]:
    return module_shapes_from_model_dir(adv_base_model)
