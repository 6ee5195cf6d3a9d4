"""The serving-time safety path's layer table: the safety weights each LoRA-wrapped layer adds.

:func:`build_layer_safety` maps every LoRA-wrapped linear layer in the safety adapter's selected
layers to a :class:`LayerSafety` (one A/B pair per output slice: q/k/v, gate/up), in the layer's LoRA
dtype and device, and refuses to start when the safety adapter does not cover what vLLM serves
(:func:`check_safety_coverage`): a partial safety delta would silently protect only some layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kernels.torch_ops import PackedSafety, pack_safety

from ..core.adapter import layer_index
from ..errors import SafeguardError

if TYPE_CHECKING:
    from ..core.adapter import LoRAModule
    from ..methods.safegene import SafetyAdapter


class SafetyCoverageError(SafeguardError):
    """The safety delta covers fewer modules (or slices) than the model serves LoRA on."""


def _as_slice_map(modules: Iterable[str] | Mapping[str, int]) -> dict[str, int | None]:
    if isinstance(modules, Mapping):
        return {str(k): int(v) for k, v in modules.items()}
    if isinstance(modules, str):
        raise TypeError("pass a collection of module names, not a single string")
    return dict.fromkeys((str(m) for m in modules), None)


def check_safety_coverage(
    expected_modules: Iterable[str] | Mapping[str, int], safety_modules: Iterable[str] | Mapping[str, int]
) -> list[str]:
    """Raise :class:`SafetyCoverageError` unless the safety delta covers every expected module.

    Either argument may be a collection of module names or a mapping ``name -> number of slices``
    (e.g. ``{"model.layers.0.self_attn.qkv_proj": 3}``); when both give slice counts they must
    match. Extra safety modules are allowed. Returns the sorted covered module names.
    """
    expected = _as_slice_map(expected_modules)
    safety = _as_slice_map(safety_modules)
    missing = sorted(set(expected) - set(safety))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise SafetyCoverageError(
            f"safety delta covers {len(expected) - len(missing)} of {len(expected)} expected modules; "
            f"missing {len(missing)}: {shown}. Refusing to serve with a partial safety delta."
        )
    bad = [
        f"{name} ({safety[name]} slices, expected {n})"
        for name, n in sorted(expected.items())
        if n is not None and safety[name] is not None and safety[name] != n
    ]
    if bad:
        raise SafetyCoverageError("safety delta has the wrong number of slices for: " + ", ".join(bad))
    return sorted(expected)


@dataclass(frozen=True)
class SafetyDeltaSpec:
    """What a cached safety delta provides: its rank and ``module name -> number of slices``."""

    rank: int
    modules: Mapping[str, int]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise SafetyCoverageError(f"safety delta rank must be >= 1, got {self.rank}")
        if not self.modules:
            raise SafetyCoverageError("safety delta covers no modules")

    def check_covers(self, expected_modules: Iterable[str] | Mapping[str, int]) -> list[str]:
        """See :func:`check_safety_coverage`."""
        return check_safety_coverage(expected_modules, self.modules)


@dataclass
class LayerSafety:
    """Safety weights of one LoRA-wrapped layer, one entry per output slice (q/k/v, gate/up)."""

    name: str
    a: list[torch.Tensor]  # [r_s, in] per slice, the layer's LoRA dtype/device, contiguous
    b: list[torch.Tensor]  # [out_slice, r_s] per slice (module scaling folded in)
    _packed: PackedSafety | None = field(default=None, init=False, repr=False, compare=False)

    def packed(self) -> PackedSafety:
        """The factors packed for the CPU path's ``packed_safety_delta`` (built once, then kept)."""
        if self._packed is None:
            self._packed = pack_safety(self.a, self.b)
        return self._packed


def linear_lora_layers(lora_model_manager: Any) -> Iterable[tuple[str, Any]]:
    """``(vLLM module name, layer)`` of every LoRA-wrapped linear layer of the adapter manager."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    for name, layer in lora_model_manager.modules.items():
        if isinstance(layer, BaseLinearLayerWithLoRA):
            yield name, layer


def _tp_shard(layer: Any, a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> tuple[list, list]:
    """The rank's shard of the per-slice safety factors, cut by the layer's own ``slice_lora_a`` /
    ``slice_lora_b`` exactly as vLLM's ``set_lora`` cuts a task adapter (column-parallel: B's output
    rows, per slice for q/k/v and gate/up; row-parallel: A's input columns, each rank adding its
    partial product before the all-reduce). Tensor parallel size 1: unchanged."""
    if int(getattr(layer, "tp_size", 1) or 1) <= 1:
        return a_list, b_list
    if len(a_list) == 1:
        return [layer.slice_lora_a(a_list[0])], [layer.slice_lora_b(b_list[0])]
    return list(layer.slice_lora_a(list(a_list))), list(layer.slice_lora_b(list(b_list)))


def build_layer_safety(
    layers: Iterable[tuple[str, Any]],
    packed_modules_mapping: dict[str, list[str]],
    safety: SafetyAdapter,
    allocation: AbstractContextManager[Any] | None = None,
) -> list[tuple[str, Any, LayerSafety | None]]:
    """Every LoRA-wrapped linear layer with its safety weights (None outside the selected layers).

    ``layers``: ``(vLLM module name, layer)`` where the layer has ``lora_a_stacked`` (one tensor per
    slice, ``[max_loras, 1, r, in]``) and ``output_slices``. Packed vLLM modules are split with
    ``packed_modules_mapping`` (``qkv_proj -> q/k/v_proj``, ``gate_up_proj -> gate/up_proj``). Under
    tensor parallelism each rank keeps its shard (:func:`_tp_shard`). ``allocation``: the context the
    device tensors are allocated in (vLLM's "runtime" memory pool under sleep mode).

    Raises:
        SafetyCoverageError: a served layer (in the selected layers) lacks a safety module or slice, a
            shape does not match, or nothing at all is covered.
    """
    expected: dict[str, int] = {}
    covered: dict[str, int] = {}
    found: dict[str, list[LoRAModule]] = {}
    selected = safety.layers
    all_layers = list(layers)
    for name, layer in all_layers:
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
            found[name] = mods
    if not expected:
        raise SafetyCoverageError(
            f"the safety adapter's selected layers {sorted(selected)} contain no LoRA-wrapped linear layer "
            "of the served model"
        )
    check_safety_coverage(expected, covered)
    out: list[tuple[str, Any, LayerSafety | None]] = []
    with allocation if allocation is not None else nullcontext():
        for name, layer in all_layers:
            chosen = found.get(name)
            out.append((name, layer, None if chosen is None else _layer_safety(name, layer, chosen)))
    return out


def _layer_safety(name: str, layer: Any, mods: list[LoRAModule]) -> LayerSafety:
    ref = layer.lora_a_stacked[0]
    r_s = max(m.lora_a.shape[0] for m in mods)
    full_a, full_b = [], []
    for m in mods:
        # Zero-padding a smaller rank adds exact zeros: same result as the unpadded product.
        a = torch.zeros(r_s, m.lora_a.shape[1], dtype=torch.float32)
        b = torch.zeros(m.lora_b.shape[0], r_s, dtype=torch.float32)
        a[: m.lora_a.shape[0]] = m.lora_a.float()
        b[:, : m.lora_b.shape[1]] = m.lora_b.float() * float(m.scaling)
        full_a.append(a)
        full_b.append(b)
    a_list, b_list = _tp_shard(layer, full_a, full_b)
    for s, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        in_f = layer.lora_a_stacked[s].shape[-1]
        out_f = int(layer.output_slices[s])
        if tuple(a.shape) != (r_s, in_f) or tuple(b.shape) != (out_f, r_s):
            raise SafetyCoverageError(
                f"{name} slice {s} ({mods[s].name}): safety A {tuple(a.shape)} / B {tuple(b.shape)} "
                f"do not fit the layer (in {in_f}, out {out_f}, tensor parallel size "
                f"{getattr(layer, 'tp_size', 1)})"
            )
    to = {"device": ref.device, "dtype": ref.dtype}
    return LayerSafety(
        name,
        [a.to(**to).contiguous() for a in a_list],
        [b.to(**to).contiguous() for b in b_list],
    )
