"""Fixtures for the plugin tests: one tiny serving workspace (model, reference, adapters) per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_safeguard.testing.workspace import Workspace, prepare_tiny_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return prepare_tiny_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
