"""Guard probe inside the vLLM worker: score each "auto" request at the end of its prefill.

Semantics (one engine step)::

    # before the forward pass (from vLLM's _set_active_loras, through alpha_runner):
    for request i in the batch, with c = computed tokens, p = prompt tokens, n = scheduled tokens:
        if it asked for "auto" and c < p <= c + n:   # its prefill ends in this step
            pending += (req_i, offset_i + (p - c - 1))   # flat index of its last prompt token
    pending_index[k], pending_valid[k], token_pending[t] <- pending   (persistent buffers, in place)
    # in the forward pass, after decoder layer L: torch.ops.safeguard.guard_score (one op)
    h = hidden_states + residual                     # the residual stream at L's output
    score[k] = sigmoid(((h[pending_index[k]] - mean) / std) . w + b)
    alpha_k  = probe.alpha_for(score[k])     # alpha_high at/above the threshold, a ramp below it
    token_alpha[t] = alpha_k for every token t of pending request k    # layers after L use it now
    # after the step (GuardRuntime.collect): scores -> AlphaTable (the request's later steps),
    #   metrics, and the per-request record the HTTP middleware returns as headers

The probe reads a hidden state the serving pass computes anyway: no second model, no extra pass. The
op is fixed-shape tensor work on persistent buffers (no host sync, no data-dependent Python), so it is
traced once by torch.compile and replays inside CUDA graphs; a forward hook only places the op call
after layer L (Dynamo inlines the hook: its body is the op, nothing else).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.torch_ops.guard_score import register_guard_score_op

from ..alpha import AlphaTable, wants_auto, wants_score
from ..core.model_files import model_fingerprint
from ..errors import SafetyPathError
from ..guard.probe import GuardProbe
from ..metrics import get_metrics
from .guard_http import record_name, runtime_dir

try:  # vLLM's marker for the syncs it allows inside execute_model (VLLM_GPU_SYNC_CHECK)
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed
except ImportError:  # pragma: no cover - older vLLM
    gpu_sync_allowed = nullcontext  # type: ignore[assignment,misc]

logger = logging.getLogger("vllm_safeguard")


@dataclass
class PendingScore:
    req_id: str
    token_index: int  # flat index of the request's last prompt token in this step
    token_start: int  # the request's first token in this step
    token_end: int  # one past its last token in this step
    record: bool = False  # the client asked for the score (safeguard_return_score)


@dataclass
class GuardBuffers:
    """The op's persistent inputs and outputs (allocated once, before any graph is captured)."""

    pending_index: torch.Tensor  # [P] int64
    pending_valid: torch.Tensor  # [P] bool
    token_pending: torch.Tensor  # [max_tokens] int64, -1 = the token's request is not pending
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    decision: torch.Tensor  # [threshold, alpha_low, alpha_high, ramp_low]
    token_alpha: torch.Tensor  # the safety wrappers' alpha buffer (shared, not a copy)
    scores: torch.Tensor  # [P] fp32

    @staticmethod
    def make(probe: GuardProbe, max_pending: int, token_alpha: torch.Tensor) -> GuardBuffers:
        dev, f32 = token_alpha.device, torch.float32
        return GuardBuffers(
            pending_index=torch.zeros(max_pending, dtype=torch.int64, device=dev),
            pending_valid=torch.zeros(max_pending, dtype=torch.bool, device=dev),
            token_pending=torch.full((token_alpha.numel(),), -1, dtype=torch.int64, device=dev),
            weight=probe.weight.to(dev, f32),
            bias=probe.bias.reshape(1).to(dev, f32),
            mean=probe.mean.to(dev, f32),
            std=probe.std.to(dev, f32),
            decision=torch.tensor(probe.decision(), dtype=f32, device=dev),
            token_alpha=token_alpha,
            scores=torch.zeros(max_pending, dtype=f32, device=dev),
        )

    def op_args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.pending_index,
            self.pending_valid,
            self.token_pending,
            self.weight,
            self.bias,
            self.mean,
            self.std,
            self.decision,
            self.token_alpha,
            self.scores,
        )


@dataclass
class GuardRuntime:
    """Per-worker guard state: plan (host) -> buffers (device, in place) -> op -> collect (host)."""

    probe: GuardProbe
    buffers: GuardBuffers
    table: AlphaTable  # per-request alphas of later steps (the alpha filler reads it first)
    runtime_dir: Path | None = None
    observe: Callable[[float, bool], None] | None = None  # metrics: (score, flagged)
    scores_by_request: dict[str, float] = field(default_factory=dict)
    _staged: list[PendingScore] | None = None
    _current: list[PendingScore] = field(default_factory=list)
    _num_tokens: int = 0

    def plan_step(
        self,
        req_ids: Sequence[str],
        num_scheduled: Sequence[int] | np.ndarray,
        num_computed: Sequence[int] | np.ndarray,
        num_prompt: Sequence[int] | np.ndarray,
        flags: Callable[[int], tuple[bool, bool]],
    ) -> None:
        """Find the requests whose prefill ends in this step (see module Semantics).

        Runs before every forward pass, decode steps included, so the test is vectorized, and
        ``flags(i)`` -> (wants "auto", wants its score returned) is asked only for the requests whose
        prefill ends here, never for decoding ones.
        """
        n = np.asarray(num_scheduled, dtype=np.int64)[: len(req_ids)]
        c = np.asarray(num_computed, dtype=np.int64)[: len(n)]
        p = np.asarray(num_prompt, dtype=np.int64)[: len(n)]
        starts = np.cumsum(n) - n
        pending = []
        for i in np.flatnonzero((c < p) & (p <= c + n)).tolist():
            auto, record = flags(i)
            if auto:
                start = int(starts[i])
                pending.append(
                    PendingScore(req_ids[i], start + int(p[i] - c[i]) - 1, start, start + int(n[i]), record)
                )
        self._staged = pending

    @property
    def pending(self) -> list[PendingScore]:
        """The plan staged by the last :meth:`plan_step` (not yet applied)."""
        return list(self._staged or [])

    def apply(self, num_tokens: int) -> None:
        """Write this step's plan into the op's buffers, in place (no plan staged, as in dummy and
        capture runs: nothing pending). Called after the alpha buffer is filled."""
        pending, self._staged = (self._staged or []), None
        b = self.buffers
        cap = b.pending_index.numel()
        if len(pending) > cap:
            raise ValueError(f"{len(pending)} requests end their prefill in one step; the guard holds {cap}")
        index = torch.zeros(cap, dtype=torch.int64)
        valid = torch.zeros(cap, dtype=torch.bool)
        owner = torch.full((max(num_tokens, self._num_tokens),), -1, dtype=torch.int64)
        for k, p in enumerate(pending):
            index[k], valid[k] = p.token_index, True
            owner[p.token_start : p.token_end] = k
        b.pending_index.copy_(index, non_blocking=True)
        b.pending_valid.copy_(valid, non_blocking=True)
        b.token_pending[: owner.numel()].copy_(owner, non_blocking=True)  # stale tails reset to -1 too
        self._num_tokens = num_tokens
        self._current = pending

    def hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        """Forward hook on decoder layer L: the op, nothing else (Dynamo traces it as one call)."""
        hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
        torch.ops.safeguard.guard_score(hidden, residual, *self.buffers.op_args())

    def collect(self) -> None:
        """After the step: this step's scores to the AlphaTable (later steps), metrics and records."""
        pending, self._current = self._current, []
        if not pending:
            return
        with gpu_sync_allowed():
            scores = self.buffers.scores[: len(pending)].cpu().tolist()
        for p, s in zip(pending, scores, strict=True):
            alpha = self.probe.alpha_for(s)
            flagged = s >= self.probe.manifest.threshold  # full alpha_high (a ramp alpha is not "flagged")
            self.scores_by_request[p.req_id] = s
            self.table.set(p.req_id, alpha)
            if self.observe is not None:
                self.observe(s, flagged)
            if p.record:
                self._write_record(p.req_id, s, alpha, flagged)

    def _write_record(self, req_id: str, score: float, alpha: float, flagged: bool) -> None:
        if self.runtime_dir is None:
            return
        try:
            path = self.runtime_dir / record_name(req_id)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"request_id": req_id, "score": score, "alpha": alpha, "flagged": flagged})
            )
            os.replace(tmp, path)
        except OSError as e:  # the score still drives alpha; only its report to the client is lost
            logger.warning("vllm-safeguard: cannot write guard record for %s: %s", req_id, e)

    def forget(self, live: Any) -> None:
        for rid in [r for r in self.scores_by_request if r not in live]:
            del self.scores_by_request[rid]


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder-layer list of a vLLM causal LM (``model.model.layers`` for Llama-like models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__} (expected .model.layers)")
    return layers  # type: ignore[no-any-return]


def install_hook(model: torch.nn.Module, runtime: GuardRuntime) -> Any:
    layers = decoder_layers(model)
    layer = runtime.probe.layer
    if not 0 <= layer < len(layers):
        raise ValueError(f"guard probe layer {layer} is outside the model's {len(layers)} decoder layers")
    return layers[layer].register_forward_hook(runtime.hook)


def start_guard(
    model: torch.nn.Module,
    guard_path: Path,
    model_dir: Path | None,
    table: AlphaTable,
    token_alpha: torch.Tensor,
    max_pending: int,
    model_name: str,
    allocation: AbstractContextManager[Any] | None = None,
) -> GuardRuntime:
    """Load the DSA guard probe, allocate its buffers and place its op after its decoder layer
    (raises: the caller fails closed). ``token_alpha``: the safety wrappers' alpha buffer;
    ``max_pending``: the most requests one step can hold (vLLM's max_num_seqs)."""
    register_guard_score_op()
    probe = GuardProbe.load(guard_path)
    want = probe.manifest.model_fingerprint
    if want is not None and model_dir is not None and model_fingerprint(model_dir) != want:
        raise SafetyPathError(
            f"guard probe {guard_path} was trained for another model (fingerprint mismatch)"
        )
    metrics = get_metrics()

    def observe(score: float, flagged: bool) -> None:
        try:
            metrics.guard_score.labels(model_name=model_name).observe(score)
            if flagged:
                metrics.guard_flagged.labels(model_name=model_name).inc()
        except Exception as e:  # metrics must never stop the worker
            logger.warning("vllm-safeguard: metrics error ignored: %s", e)

    folder = runtime_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with allocation if allocation is not None else nullcontext():
        buffers = GuardBuffers.make(probe, max_pending, token_alpha)
    guard = GuardRuntime(probe, buffers, table, runtime_dir=folder, observe=observe)
    install_hook(model, guard)
    m = probe.manifest
    logger.info(
        "vllm-safeguard: guard probe active on layer %d (alpha %g below score %s, rising to %g at threshold %.4f)",
        probe.layer,
        m.alpha_low,
        "(no ramp)" if m.ramp_low is None else f"{m.ramp_low:.4f}",
        m.alpha_high,
        m.threshold,
    )
    return guard


def guard_flags(extra_args: Any, *, auto_by_default: bool = False) -> tuple[bool, bool]:
    """(wants "auto", wants its score returned) of a request's ``extra_args``; ``auto_by_default``:
    a request that sends no alpha is scored too (default_alpha "auto", task-adapter requests)."""
    return wants_auto(extra_args, by_default=auto_by_default), wants_score(extra_args)
