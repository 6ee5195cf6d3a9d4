"""Guard probe inside the vLLM worker: score each request at the end of its prefill ("auto" mode).

Semantics (one engine step)::

    # before the forward pass (from the per-step LoRA/alpha fill):
    for request i in the batch, with c = computed tokens, p = prompt tokens, n = scheduled tokens:
        if c < p <= c + n:                       # its prefill ends in this step
            pending += (req_id_i, offset_i + (p - c - 1))   # flat index of its last prompt token
    # during the forward pass, after decoder layer L (forward hook, no extra pass):
    h = hidden_states + residual                 # the residual stream (vLLM fuses the add into the next norm)
    for (req, t) in pending:
        score = probe.score(h[t]);  alpha = probe.alpha_for(score)
        table.set(req, alpha)                    # decode tokens of `req` use it from the next step on
        token_alpha[tokens of req in this step] = alpha   # layers after L in this very pass use it too

The probe reads a hidden state the serving pass computes anyway: no second model, no extra pass.
Only requests that asked for ``"auto"`` are scored. Scores are also written to a small per-request
record in ``runtime_dir`` (when set) so the API-server middleware can return them to the client.

GPU note: the hook is Python; under CUDA graphs / torch.compile it would not re-run on replay, so
auto mode requires ``--enforce-eager`` on GPU (vLLM on CPU with LoRA already runs eagerly).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..alpha import wants_auto, wants_score
from ..core.model_files import model_fingerprint
from ..errors import SafetyPathError
from ..guard.probe import GuardProbe
from ..metrics import get_metrics
from .guard_http import record_name, runtime_dir

logger = logging.getLogger("vllm_safeguard")


@dataclass
class PendingScore:
    req_id: str
    token_index: int  # flat index of the request's last prompt token in this step
    token_start: int  # the request's first token in this step
    token_end: int  # one past its last token in this step
    record: bool = False  # the client asked for the score (safeguard_return_score)


@dataclass
class GuardRuntime:
    """Per-worker guard state. ``alpha_sink(req_id, alpha, start, end)`` applies a decision."""

    probe: GuardProbe
    alpha_sink: Callable[[str, float, int, int], None]
    runtime_dir: Path | None = None
    observe: Callable[[float, bool], None] | None = None  # metrics: (score, flagged)
    pending: list[PendingScore] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    _device_ready: bool = False

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
        self.pending = []
        for i in np.flatnonzero((c < p) & (p <= c + n)).tolist():
            auto, record = flags(i)
            if auto:
                start = int(starts[i])
                end = start + int(n[i])
                self.pending.append(
                    PendingScore(req_ids[i], start + int(p[i] - c[i]) - 1, start, end, record)
                )

    def _to(self, device: torch.device, dtype: torch.dtype) -> None:
        pr = self.probe
        pr.weight, pr.bias = pr.weight.to(device, torch.float32), pr.bias.to(device, torch.float32)
        pr.mean, pr.std = pr.mean.to(device, torch.float32), pr.std.to(device, torch.float32)
        self._device_ready = True

    def hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        """Forward hook on decoder layer L: score the pending requests' last prompt tokens."""
        if not self.pending:
            return
        hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
        stream = hidden if residual is None else hidden + residual
        if not self._device_ready:
            self._to(stream.device, stream.dtype)
        idx = torch.tensor([p.token_index for p in self.pending], device=stream.device)
        scores = self.probe.score(stream.index_select(0, idx)).tolist()
        for p, s in zip(self.pending, scores, strict=True):
            alpha = self.probe.alpha_for(s)
            flagged = s >= self.probe.manifest.threshold
            self.scores[p.req_id] = s
            self.alpha_sink(p.req_id, alpha, p.token_start, p.token_end)
            if self.observe is not None:
                self.observe(s, flagged)
            if p.record:
                self._write_record(p.req_id, s, alpha, flagged)
        self.pending = []

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
        for rid in [r for r in self.scores if r not in live]:
            del self.scores[rid]


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


# Attribute of the model runner holding its GuardRuntime.
GUARD_ATTR = "_safeguard_guard"


def start_guard(
    runner: Any,
    guard_path: Path,
    model_dir: Path | None,
    alpha_sink: Callable[[str, float, int, int], None],
    model_name: str,
) -> GuardRuntime:
    """Load the DSA guard probe and hook it onto its decoder layer (raises: the caller fails closed).

    ``alpha_sink(req_id, alpha, start, end)`` applies a decision (the alpha filler's ``apply_decision``).
    """
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
    guard = GuardRuntime(probe, alpha_sink, runtime_dir=folder, observe=observe)
    install_hook(runner.get_model(), guard)
    setattr(runner, GUARD_ATTR, guard)
    logger.info(
        "vllm-safeguard: guard probe active on layer %d (threshold %.4f, alpha %g below / %g at or above)",
        probe.layer,
        probe.manifest.threshold,
        probe.manifest.alpha_low,
        probe.manifest.alpha_high,
    )
    return guard


def plan_guard_step(runner: Any, input_batch: Any, num_scheduled_tokens: Any) -> None:
    """Tell the guard which requests end their prefill in this step (called before the forward pass)."""
    guard = getattr(runner, GUARD_ATTR, None)
    if guard is None:
        return
    n = len(num_scheduled_tokens)
    req_ids = input_batch.req_ids[:n]

    def flags(i: int) -> tuple[bool, bool]:
        extra = getattr(getattr(runner.requests.get(req_ids[i]), "sampling_params", None), "extra_args", None)
        return wants_auto(extra), wants_score(extra)

    guard.plan_step(
        req_ids,
        num_scheduled_tokens,
        input_batch.num_computed_tokens_cpu[:n],
        input_batch.num_prompt_tokens[:n],
        flags,
    )
