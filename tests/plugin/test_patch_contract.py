"""Contract between vllm-safeguard and the installed vLLM: every patched name exists, has the expected
signature, is not overridden by a subclass, and the version is one we checked. If vLLM moves or renames
a patched function, these tests fail (and so does the plugin at startup, instead of serving unrepaired
adapters)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("vllm")

from vllm_safeguard.errors import refusal_text
from vllm_safeguard.integration import monkey_patch
from vllm_safeguard.integration import patching as vp

EXPECTED = {
    "worker_lora_init",
    "worker_lora_load_adapter",
    "serving_models_load_lora_adapter",
    # per-request safety alpha (issue 5)
    "model_manager_get_punica_wrapper",
    "runner_load_lora_model",
    "runner_set_active_loras",
    "input_processor_init",
    # the default GPU path (issue 17): both runners, dummy and capture runs, guard after the step
    "runner__set_active_loras",
    "v2_lora_state_make_lora_inputs",
    "v2_runner_add_requests",
    "v2_runner_remove_request",
    "v1_runner_execute_model",
    "v2_runner_execute_model",
}


@pytest.fixture()
def patched() -> Iterator[None]:
    import vllm.entrypoints.openai.models.serving
    import vllm.lora.model_manager
    import vllm.lora.worker_manager
    import vllm.v1.engine.input_processor
    import vllm.v1.worker.lora_model_runner_mixin  # noqa: F401

    from vllm_safeguard.integration import plugin

    plugin._registered = False
    plugin.register()
    yield
    vp.restore_patches()
    plugin._registered = False


def test_installed_vllm_satisfies_every_patch() -> None:
    assert set(vp.registered_patches()) >= EXPECTED
    problems = {name: vp.check_contract(p) for name, p in vp.registered_patches().items()}
    assert all(p == [] for p in problems.values()), problems
    assert vp.check_required_names() == []
    assert vp.version_supported(vp.vllm_version())


def test_load_adapter_target_is_where_we_patch_it() -> None:
    # Spelled out, so a rename in vLLM shows up as an obvious failure here.
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    assert "_load_adapter" in WorkerLoRAManager.__dict__
    assert "_load_adapter" not in LRUCacheWorkerLoRAManager.__dict__
    assert "__init__" not in LRUCacheWorkerLoRAManager.__dict__


def test_moved_function_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    patch = vp.registered_patches()["worker_lora_load_adapter"]
    renamed = dataclasses.replace(patch, name="t_renamed", attr="_load_adapter_v2")
    assert any("not found" in p for p in vp.check_contract(renamed))
    moved = dataclasses.replace(patch, name="t_moved", module="vllm.lora.worker_manager_v2")
    assert any("cannot resolve" in p for p in vp.check_contract(moved))
    assert any("not among the versions" in p for p in vp.check_contract(patch, version="0.40.1"))

    # A renamed parameter (vLLM calls it by keyword somewhere else) is a contract change too.
    monkeypatch.setattr(WorkerLoRAManager, "_load_adapter", lambda self, req: None)
    assert any("parameters" in p for p in vp.check_contract(patch))
    monkeypatch.undo()
    monkeypatch.setattr(
        LRUCacheWorkerLoRAManager, "_load_adapter", lambda self, lora_request: None, raising=False
    )
    assert any("overrides" in p for p in vp.check_contract(patch))
    vp.register_patch(renamed)
    try:
        with pytest.raises(vp.PatchContractError, match="_load_adapter_v2"):
            vp.apply_patches(["t_renamed"])
    finally:
        vp._REGISTRY.pop("t_renamed")


def test_register_is_idempotent_and_wrappers_delegate(patched: None) -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    from vllm_safeguard.integration import plugin

    for name in EXPECTED:
        assert vp.is_applied(name)
    wrapped = WorkerLoRAManager._load_adapter
    plugin._registered = False
    plugin.register()  # a second registration must not double-wrap
    assert vp.apply_patches() == []
    assert WorkerLoRAManager._load_adapter is wrapped
    assert LRUCacheWorkerLoRAManager._load_adapter is wrapped
    assert getattr(wrapped.__wrapped__, vp.PATCH_MARK, None) is None  # one layer only
    assert OpenAIServingModels.load_lora_adapter.__wrapped__.__name__ == "load_lora_adapter"


def test_register_is_cheap_and_defers_heavy_imports() -> None:
    code = (
        "import time, sys, vllm; t=time.perf_counter(); import vllm_safeguard; vllm_safeguard.register(); "
        "dt=time.perf_counter()-t; assert 'vllm.lora.worker_manager' not in sys.modules, 'eager import'; "
        "import vllm.lora.worker_manager as wm; from vllm_safeguard.integration import patching as vp; "
        "assert vp.is_applied('worker_lora_load_adapter'); print(dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0


def test_refusal_text_survives_wrapping() -> None:
    from vllm_safeguard.errors import AdapterRefused

    msg = str(AdapterRefused("x", "bad header"))
    wrapped = (
        f"Call to add_lora method failed: Worker failed with error '{msg}', please check the stack trace"
    )
    assert refusal_text(wrapped) == "adapter 'x' refused (error): bad header"
    assert refusal_text("some other failure") is None


async def _fake_original(self: object, request: object, base_model_name: str | None = None) -> object:
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from vllm_safeguard.errors import AdapterRefused

    if request == "ours":
        from http import HTTPStatus

        return create_error_response(
            message=f"Call to add_lora method failed: {AdapterRefused('x', 'nope')}",
            err_type="InternalServerError",
            status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        )
    return "Success"


def test_serving_patch_turns_our_500_into_400() -> None:
    import asyncio

    wrapper = monkey_patch._wrap_serving_load(_fake_original)
    res = asyncio.run(wrapper(None, "ours"))
    assert res.error.code == 400 and res.error.type == "BadRequestError"
    assert res.error.message == "vllm-safeguard: adapter 'x' refused (error): nope"
    assert asyncio.run(wrapper(None, "other")) == "Success"


def test_runners_inherit_the_patched_lora_mixin_methods() -> None:
    # Not checkable at apply time (the runner modules are mid-import then), so checked here.
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    for target in monkey_patch.RUNNERS_USING_LORA_MIXIN:
        mod, _, name = target.partition(":")
        cls = vp._resolve_holder(mod, name)
        assert issubclass(cls, LoRAModelRunnerMixin), target
        for attr in ("load_lora_model", "set_active_loras", "_set_active_loras"):
            assert vp._unwrap(getattr(cls, attr)) is vp._unwrap(LoRAModelRunnerMixin.__dict__[attr]), (
                target,
                attr,
            )
    import inspect

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    # V1 runners stage alpha in set_active_loras, which calls _set_active_loras; V2 stages in
    # LoraState.make_lora_inputs, whose result goes to _set_active_loras. If either call moves, the
    # per-token alpha would silently stay 0: fail here instead.
    assert "self.set_active_loras(" in inspect.getsource(V1)
    v2 = inspect.getsource(V2)
    assert "self.lora_state.make_lora_inputs(" in v2 and "self._set_active_loras(*lora_inputs)" in v2
    # The runners that subclass V1/V2 inherit the patched step methods (the guard reads its scores
    # after execute_model; V2 records sampling params in add_requests).
    for target in monkey_patch.V1_RUNNERS[1:]:
        mod, _, name = target.partition(":")
        assert vp._unwrap(vp._resolve_holder(mod, name).execute_model) is vp._unwrap(
            V1.__dict__["execute_model"]
        )
    for target in monkey_patch.V2_RUNNERS[1:]:
        cls = vp._resolve_holder(*target.split(":"))
        for attr in ("execute_model", "add_requests", "_remove_request"):
            assert vp._unwrap(getattr(cls, attr)) is vp._unwrap(V2.__dict__[attr]), (target, attr)


def test_punica_selector_patch_only_swaps_when_asked(patched: None) -> None:
    from vllm.lora import model_manager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_safeguard.integration.punica_wrapper import selector
    from vllm_safeguard.integration.punica_wrapper.punica_cpu import SafeguardPunicaWrapperCPU

    assert vp.is_applied("model_manager_get_punica_wrapper")
    kwargs = {"max_batches": 4, "device": "cpu", "lora_config": None}
    try:
        selector.request_safety_wrapper(False)
        w = model_manager.get_punica_wrapper(16, **kwargs)
        assert type(w) is PunicaWrapperCPU
        selector.request_safety_wrapper(True)
        w = model_manager.get_punica_wrapper(16, **kwargs)
        assert isinstance(w, SafeguardPunicaWrapperCPU) and w.safeguard_alpha.numel() == 16
    finally:
        selector.request_safety_wrapper(False)


def test_step_wrappers_stage_before_and_apply_after_the_original() -> None:
    import numpy as np

    from vllm_safeguard.integration.alpha_runner import FILLER_ATTR

    calls: list[str] = []

    def set_active(
        self: object, input_batch: object, num_scheduled_tokens: object, *a: object, **k: object
    ) -> None:
        calls.append("set_active_loras")
        _set_active(self, (1,), (1, 1, 1))

    def original_set(self: object, prompt: object, token: object, *a: object, **k: object) -> None:
        calls.append("_set_active_loras")

    class Filler:
        guard = None

        def stage(self, req_ids: list[str], n: object, *a: object) -> None:
            calls.append(f"stage {list(req_ids)}")

        def apply(self, num_tokens: int) -> None:
            calls.append(f"apply {num_tokens}")

    runner = type("R", (), {})()
    runner.requests = {}
    _set_active = monkey_patch._wrap__set_active_loras(original_set)
    wrapper = monkey_patch._wrap_set_active_loras(set_active)
    batch = type("B", (), {"req_ids": ["r1"], "num_computed_tokens_cpu": [0], "num_prompt_tokens": [3]})()
    wrapper(runner, batch, np.array([3]))
    assert calls == ["set_active_loras", "_set_active_loras"]  # no filler: the alpha path is off
    setattr(runner, FILLER_ATTR, Filler())
    calls.clear()
    wrapper(runner, batch, np.array([3]))
    assert calls == ["stage ['r1']", "set_active_loras", "_set_active_loras", "apply 3"]
    calls.clear()
    _set_active(runner, (), (-1, -1), set(), "TOWER")  # a multimodal tower's mapping: not the LM's alpha
    assert calls == ["_set_active_loras"]
