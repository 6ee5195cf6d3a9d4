"""The worker -> API-server binding hand-off: a request whose adapter's admitted copy is gone fails
alone (a 400 from the input processor) instead of reaching the engine step."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_safeguard.admission.bindings import binding_file, binding_problem, publish_binding


def test_binding_round_trip_and_loss(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "adapter_model.safetensors").write_bytes(b"x")
    publish_binding(tmp_path, "m", "../evil/name", 7, entry)
    f = binding_file(tmp_path, "m", "../evil/name")
    assert f.is_file() and f.parent.parent == tmp_path / "bindings"  # names are hashed, never paths
    assert binding_problem(tmp_path, "m", "../evil/name", 7) is None
    assert binding_problem(tmp_path, "m", "../evil/name", 8) is None  # another load: the worker decides
    assert binding_problem(tmp_path, "other-model", "../evil/name", 7) is None
    shutil.rmtree(entry)
    problem = binding_problem(tmp_path, "m", "../evil/name", 7)
    assert problem is not None and "admitted canonical copy is gone" in problem


def test_input_processor_refuses_a_request_whose_copy_is_gone(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.integration.monkey_patch import _wrap_validate_lora

    calls: list[object] = []
    validate = _wrap_validate_lora(lambda self, req: calls.append(req))
    processor = SimpleNamespace(
        vllm_config=SimpleNamespace(
            additional_config={"safeguard": {"cache_dir": str(tmp_path)}},
            model_config=SimpleNamespace(served_model_name=["tiny"], model="/m"),
        )
    )
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "adapter_model.safetensors").write_bytes(b"x")
    publish_binding(tmp_path, "tiny", "a", 3, entry)
    req = LoRARequest("a", 3, "/somewhere")
    validate(processor, req)  # present: accepted
    validate(processor, None)  # no adapter: nothing to check
    shutil.rmtree(entry)
    with pytest.raises(VLLMValidationError, match="admitted canonical copy is gone"):
        validate(processor, req)
    assert len(calls) == 3  # vLLM's own validation always ran first
