"""Per-request safety alpha: parser/validator, config, the CPU punica wrapper against a dense
computation, the layer table's coverage check, and the per-step alpha fill."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from vllm_safeguard.alpha import (
    ALPHA_KEY,
    AlphaPolicy,
    AlphaTable,
    AlphaValueError,
    parse_alpha,
    resolve_request_alpha,
    wants_auto,
)
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.errors import ConfigError

POLICY = AlphaPolicy(enabled=True, default=1.0, base_default=0.0, lo=0.0, hi=1.0)


# ------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize("value", [0, 1, 0.0, 0.25, 1.0])
def test_valid_numbers(value: float) -> None:
    assert parse_alpha(value, POLICY) == float(value)


@pytest.mark.parametrize(
    "value",
    [99, -1, 1.0000001, -0.0001, math.nan, math.inf, -math.inf, "x", "0.5", "", True, False, None, [0.5], {}],
)
def test_invalid_values_name_field_and_range(value: Any) -> None:
    with pytest.raises(AlphaValueError) as e:
        parse_alpha(value, POLICY)
    msg = str(e.value)
    assert ALPHA_KEY in msg and "[0, 1]" in msg, msg


def test_auto_reserved_until_guard() -> None:
    with pytest.raises(AlphaValueError, match="guard"):
        parse_alpha("auto", POLICY)
    assert parse_alpha("AUTO", AlphaPolicy(enabled=True, auto_available=True)) == "auto"


def test_disabled_policy_refuses_the_field() -> None:
    with pytest.raises(AlphaValueError, match="not available"):
        parse_alpha(0.5, AlphaPolicy(enabled=False))


def test_custom_range() -> None:
    p = AlphaPolicy(enabled=True, lo=0.5, hi=2.0, default=1.0)
    assert parse_alpha(2, p) == 2.0
    with pytest.raises(AlphaValueError, match=r"\[0.5, 2\]"):
        parse_alpha(0.25, p)


def test_resolve_defaults_and_invalid_fallback() -> None:
    assert resolve_request_alpha(None, POLICY, has_task_adapter=True) == 1.0
    assert resolve_request_alpha({}, POLICY, has_task_adapter=False) == 0.0
    assert resolve_request_alpha({ALPHA_KEY: 0.3}, POLICY, has_task_adapter=False) == 0.3
    # Only reachable without the entry-point validator: logged, default used, never clamped.
    assert resolve_request_alpha({ALPHA_KEY: 7}, POLICY, has_task_adapter=True) == 1.0


def test_validator_entry_point_rejects_and_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from vllm_safeguard import alpha
    from vllm_safeguard.integration.alpha_validator import SafeguardAlphaValidator

    monkeypatch.setenv("SAFEGUARD_ALPHA_ENABLED", "true")
    alpha.set_frontend_additional_config({"safeguard": {"alpha_max": 2.0}})
    try:
        v = SafeguardAlphaValidator
        v.validate_params(SimpleNamespace(extra_args=None))
        v.validate_params(SimpleNamespace(extra_args={ALPHA_KEY: 1.5}))  # --additional-config range
        with pytest.raises(ValueError, match=r"safeguard_alpha.*\[0, 2\]"):
            v.validate_params(SimpleNamespace(extra_args={ALPHA_KEY: 3}))
        proc = v(None, "cpu", False)
        logits = torch.randn(2, 5)
        assert proc.apply(logits) is logits and proc.is_argmax_invariant()
        from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2

        assert issubclass(v, V1) and issubclass(v, V2)  # the V2 runner's loader refuses V1-only plugins
    finally:
        alpha.set_frontend_additional_config(None)


def test_config_alpha_fields() -> None:
    cfg = load_config({"safeguard": {"alpha_enabled": True, "alpha_max": 2, "default_alpha": 1.5}}, env={})
    assert AlphaPolicy.from_config(cfg) == AlphaPolicy(True, 1.5, 0.0, 0.0, 2.0)
    with pytest.raises(ConfigError, match="default_alpha"):
        load_config({"safeguard": {"default_alpha": 1.5}}, env={})
    with pytest.raises(ConfigError, match="alpha_min"):
        load_config({"safeguard": {"alpha_min": 2.0, "alpha_max": 1.0}}, env={})
    with pytest.raises(ConfigError, match="finite"):
        load_config({}, env={"SAFEGUARD_ALPHA_MAX": "nan"})
    assert not AlphaPolicy.from_config(
        load_config({"safeguard": {"alpha_enabled": True, "enabled": False}}, env={})
    ).enabled


def test_default_alpha_auto_means_the_guard_decides(tmp_path: Path) -> None:
    # The default ("auto"): such requests start at 0 and the guard scores them when one is configured.
    cfg = load_config({"safeguard": {"alpha_enabled": True, "guard_path": str(tmp_path)}}, env={})
    assert cfg.default_alpha == "auto"
    policy = AlphaPolicy.from_config(cfg)
    assert policy.default_auto and policy.default == 0.0 and policy.auto_available
    assert resolve_request_alpha(None, policy, has_task_adapter=True) == 0.0
    assert wants_auto(None, by_default=True) and wants_auto({}, by_default=True)
    assert not wants_auto({"safeguard_alpha": 1.0}, by_default=True)
    assert not wants_auto(None) and wants_auto({"safeguard_alpha": "auto"})
    # Without a guard nothing is scored: the load-time repair alone (alpha 0).
    no_guard = AlphaPolicy.from_config(load_config({"safeguard": {"alpha_enabled": True}}, env={}))
    assert not no_guard.default_auto and no_guard.default == 0.0
    # A number keeps its meaning.
    fixed = load_config({"safeguard": {"alpha_enabled": True, "default_alpha": 0.5}}, env={})
    assert AlphaPolicy.from_config(fixed).default == 0.5 and not AlphaPolicy.from_config(fixed).default_auto


def test_alpha_table() -> None:
    t = AlphaTable()
    assert not t and t.get("a") is None
    t.set("a", 0.5)
    t.set("b", 1.0)
    t.prune({"a": 1})
    assert t.get("a") == 0.5 and t.get("b") is None and len(t) == 1
    with pytest.raises(ValueError):
        t.set("c", math.nan)


# ------------------------------------------------------------------------------ CPU wrapper

IN, OUTS, R, RS, MAX_LORAS = 32, (32, 16, 16), 4, 3, 2


def _wrapper_and_layer(seed: int = 0) -> tuple[Any, Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    pytest.importorskip("vllm")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_safeguard.integration.punica_wrapper.punica_cpu import SafeguardPunicaWrapperCPU

    g = torch.Generator().manual_seed(seed)
    # One spare zero slot: vLLM's CPU ops index the stacked weights with -1 for base-model tokens.
    a = tuple(torch.randn(MAX_LORAS + 1, 1, R, IN, generator=g) * 0.2 for _ in OUTS)
    b = tuple(torch.randn(MAX_LORAS + 1, 1, o, R, generator=g) * 0.2 for o in OUTS)
    for t in (*a, *b):
        t[-1].zero_()
    # tokens: request 1 (lora id 1, 3 tokens), request 2 (base, 2 tokens), request 3 (lora id 2, 2 tokens)
    ids = (1, 1, 1, 0, 0, 2, 2)
    mapping = LoRAMapping(ids, (1, 0, 2), is_prefill=True)
    ours = SafeguardPunicaWrapperCPU(64, 8, "cpu")
    plain = PunicaWrapperCPU(64, 8, "cpu")
    for w in (ours, plain):
        w.update_metadata(mapping, [1, 2], MAX_LORAS + 1, 100)
    return ours, plain, a, b


def _safety(seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(RS, IN, generator=g) * 0.2 for _ in OUTS], [
        torch.randn(o, RS, generator=g) * 0.2 for o in OUTS
    ]


def _bind(ours: Any, safety: Any) -> Any:
    """A LoRA layer bound to ``ours`` with ``safety`` (a LayerSafety or None); its punica wrapper."""
    layer = SimpleNamespace(output_slices=OUTS)
    layer.set_mapping = lambda w: setattr(layer, "punica_wrapper", w)
    ours.bind_layers([("l", layer, safety)])
    return layer.punica_wrapper


def test_cpu_wrapper_matches_dense() -> None:
    from vllm_safeguard.integration.layer_table import LayerSafety

    ours, _, a, b = _wrapper_and_layer()
    sa, sb = _safety()
    bound = _bind(ours, LayerSafety("l", sa, sb))
    alpha = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    ours.set_token_alpha(alpha)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(2))
    y0 = torch.randn(7, sum(OUTS))
    y = y0.clone()
    bound.add_lora_linear(y, x, a, b, 1.0, OUTS)

    slot = [0, 0, 0, -1, -1, 1, 1]
    expected = y0.double().clone()
    for t in range(7):
        off = 0
        for s, o in enumerate(OUTS):
            d = torch.zeros(o, dtype=torch.float64)
            if slot[t] >= 0:
                d += x[t].double() @ a[s][slot[t], 0].double().T @ b[s][slot[t], 0].double().T
            d += alpha[t].double() * (x[t].double() @ sa[s].double().T @ sb[s].double().T)
            expected[t, off : off + o] += d
            off += o
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_wrapper_alpha_zero_and_uncovered_layers_are_bit_identical() -> None:
    from vllm_safeguard.integration.layer_table import LayerSafety

    ours, plain, a, b = _wrapper_and_layer()
    sa, sb = _safety()
    x = torch.randn(7, IN)
    y0 = torch.randn(7, sum(OUTS))
    ref = y0.clone()
    plain.add_lora_linear(ref, x, a, b, 1.0, OUTS)

    bound = _bind(ours, LayerSafety("l", sa, sb))
    ours.set_token_alpha(torch.zeros(7))
    y = y0.clone()
    bound.add_lora_linear(y, x, a, b, 1.0, OUTS)
    assert torch.equal(y, ref)

    ours.set_token_alpha(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))  # only token 3
    y = y0.clone()
    bound.add_lora_linear(y, x, a, b, 1.0, OUTS)
    changed = (y != ref).any(dim=1).tolist()
    assert changed == [False, False, False, True, False, False, False]

    unselected = _bind(ours, None)  # a layer without safety weights: the parent, unchanged
    y = y0.clone()
    unselected.add_lora_linear(y, x, a, b, 1.0, OUTS)
    assert torch.equal(y, ref)


def test_cpu_wrapper_leaves_base_model_tokens_alone_when_last_slot_is_loaded() -> None:
    """vLLM-CPU's torch ops read slot -1 (the last one) for base-model tokens; ours must not."""
    ours, plain, a, b = _wrapper_and_layer()
    g = torch.Generator().manual_seed(5)
    for t in (*a, *b):
        t[-1].copy_(torch.randn(t[-1].shape, generator=g))  # an adapter in the last slot
    x = torch.randn(7, IN, generator=g)
    y0 = torch.randn(7, sum(OUTS), generator=g)
    ref = y0.clone()
    plain.add_lora_linear(ref, x, a, b, 1.0, OUTS)
    bare = [3, 4]  # request 2 has no adapter
    # vLLM's own behaviour (if this starts failing, vLLM fixed -1 and the restore can go):
    assert not torch.equal(ref[bare], y0[bare])
    ours.set_token_alpha(torch.zeros(7))
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, OUTS)
    assert torch.equal(y[bare], y0[bare])
    lora_rows = [0, 1, 2, 5, 6]
    assert torch.equal(y[lora_rows], ref[lora_rows])  # adapter tokens: vLLM's ops, bit for bit


def test_cpu_wrapper_leaves_base_model_rows_alone_in_embedding_and_logits_loras() -> None:
    """The same -1 gather in vLLM's embedding (per token) and logits (per sequence) LoRA paths."""
    ours, plain, _, _ = _wrapper_and_layer()
    g = torch.Generator().manual_seed(6)
    vocab, slots = 11, MAX_LORAS + 1
    b_emb = torch.randn(slots, 1, OUTS[0], R, generator=g)  # every slot loaded, the last one too
    x_emb, y_emb = torch.randn(7, R, generator=g), torch.randn(7, OUTS[0], generator=g)
    a_log, b_log = torch.randn(slots, 1, R, IN, generator=g), torch.randn(slots, 1, vocab, R, generator=g)
    x_log, y_log = torch.randn(3, IN, generator=g), torch.randn(3, vocab, generator=g)
    for y0, bare, rest, call in (
        (y_emb, [3, 4], [0, 1, 2, 5, 6], lambda w, y: w.add_lora_embedding(y, x_emb, b_emb)),
        (y_log, [1], [0, 2], lambda w, y: w.add_lora_logits(y, x_log, a_log, b_log, 1.0)),
    ):
        ref, y = y0.clone(), y0.clone()
        call(plain, ref)
        assert not torch.equal(ref[bare], y0[bare])  # vLLM's own behaviour: the last slot's update
        call(ours, y)
        assert torch.equal(y[bare], y0[bare]) and torch.equal(y[rest], ref[rest])


def test_alpha_buffer_updated_in_place_and_tail_cleared() -> None:
    ours, _, _, _ = _wrapper_and_layer()
    buf = ours.safeguard_alpha
    ptr = buf.data_ptr()
    ours.set_token_alpha(torch.full((5,), 0.5))
    ours.set_token_alpha(torch.full((2,), 1.0))
    assert ours.safeguard_alpha.data_ptr() == ptr and buf.dtype == torch.float32
    assert buf[:2].tolist() == [1.0, 1.0] and buf[2:5].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="exceed"):
        ours.set_token_alpha(torch.zeros(65))


# ------------------------------------------------------------------------------- layer table


def _fake_safety(layers: list[int], kinds: list[str], rank: int = 2) -> Any:
    from vllm_safeguard.methods.safegene import SafetyAdapter, SafetyManifest

    shapes = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}
    mods = {}
    for li in range(2):
        for k in kinds:
            n = f"model.layers.{li}.self_attn.{k}"
            mods[n] = LoRAModule(n, torch.randn(rank, IN), torch.randn(shapes[k], rank), 0.5)
    return SafetyAdapter(LoRAAdapter({}, mods), SafetyManifest(rank=rank, layers=layers))


def _fake_layers() -> list[tuple[str, Any]]:
    out = []
    for li in range(2):
        qkv = SimpleNamespace(
            lora_a_stacked=tuple(torch.zeros(2, 1, 4, IN) for _ in range(3)), output_slices=(32, 16, 16)
        )
        o = SimpleNamespace(lora_a_stacked=(torch.zeros(2, 1, 4, IN),), output_slices=(32,))
        out += [(f"model.layers.{li}.self_attn.qkv_proj", qkv), (f"model.layers.{li}.self_attn.o_proj", o)]
    return out


PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def test_layer_table_maps_packed_slices() -> None:
    from vllm_safeguard.integration.layer_table import build_layer_safety

    safety = _fake_safety([0, 1], ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers = _fake_layers()
    table = build_layer_safety(layers, PACKED, safety)
    assert len(table) == 4 and all(s is not None for _, _, s in table)
    name, layer, qkv = table[0]
    assert (name, layer) == layers[0] and qkv is not None
    assert [t.shape for t in qkv.b] == [(32, 2), (16, 2), (16, 2)]
    k = safety.adapter.modules["model.layers.0.self_attn.k_proj"]
    assert torch.equal(qkv.b[1], k.lora_b * 0.5)  # scaling folded


def test_layer_table_fails_loudly_on_partial_coverage() -> None:
    from vllm_safeguard.integration.layer_table import SafetyCoverageError, build_layer_safety

    with pytest.raises(SafetyCoverageError, match="covers 2 of 4"):
        build_layer_safety(_fake_layers(), PACKED, _fake_safety([0, 1], ["q_proj", "v_proj", "o_proj"]))
    # Layers outside the adapter's selected layers are not expected (data-aware selection): they
    # are bound without safety weights (vLLM's task LoRA alone) ...
    table = build_layer_safety(
        _fake_layers(), PACKED, _fake_safety([1], ["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    assert [s is not None for _, _, s in table] == [False, False, True, True]
    # ... but a selection that covers nothing served is an error, not a silent no-op.
    with pytest.raises(SafetyCoverageError, match="no LoRA-wrapped"):
        build_layer_safety(_fake_layers(), PACKED, _fake_safety([7], ["q_proj"]))


# ------------------------------------------------------------------------------- per-step fill


class _Sink:
    def __init__(self) -> None:
        self.got: list[torch.Tensor] = []

    def set_token_alpha(self, alpha: torch.Tensor) -> None:
        self.got.append(alpha.clone())


def _req(alpha: Any = None, lora_id: int | None = 1) -> Any:
    extra = {ALPHA_KEY: alpha} if alpha is not None else None
    lora = SimpleNamespace(lora_int_id=lora_id) if lora_id else None
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), lora_request=lora)


def _stage(
    filler: Any, req_ids: list[str], requests: dict[str, Any], num_scheduled: np.ndarray
) -> torch.Tensor:
    """One step: stage from ``requests`` (as a runner's hook does), then apply."""

    def request(rid: str) -> tuple[Any, Any]:
        return requests[rid].sampling_params, requests[rid].lora_request

    filler.stage(req_ids, num_scheduled, request, lambda guard, flags: None, requests)
    return filler.apply(int(num_scheduled.sum()))  # type: ignore[no-any-return]


def test_filler_per_token_alpha_defaults_and_table() -> None:
    pytest.importorskip("vllm")
    from vllm_safeguard.integration.alpha_runner import TokenAlphaFiller

    sink = _Sink()
    filler = TokenAlphaFiller([sink], POLICY)  # type: ignore[list-item]
    requests = {"a": _req(0.0), "b": _req(None), "c": _req(None, lora_id=None), "d": _req(0.5, None)}
    out = _stage(filler, ["a", "b", "c", "d"], requests, np.array([2, 1, 3, 1]))
    assert out.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5]
    assert out.dtype == torch.float32 and sink.got[-1].tolist() == out.tolist()
    filler.table.set("c", 0.75)  # the guard decided for request c (GuardRuntime.collect)
    out = _stage(filler, ["c", "a"], requests, np.array([1, 1]))
    assert out.tolist() == [0.75, 0.0]


def test_dummy_and_capture_runs_get_alpha_zero() -> None:
    """A step without staged alphas (vLLM's dummy, profile and CUDA-graph capture runs call only
    _set_active_loras) writes zeros of the mapping's size; a stale stage never leaks into it."""
    pytest.importorskip("vllm")
    from vllm_safeguard.integration.alpha_runner import TokenAlphaFiller

    sink = _Sink()
    filler = TokenAlphaFiller([sink], POLICY)  # type: ignore[list-item]
    assert filler.apply(3).tolist() == [0.0, 0.0, 0.0]
    requests = {"a": _req(1.0)}
    filler.stage(
        ["a"], np.array([2]), lambda r: (requests[r].sampling_params, None), lambda g, f: None, requests
    )
    assert filler.apply(5).tolist() == [0.0] * 5  # staged for 2 tokens, the run has 5: not this step's
    assert filler.apply(2).tolist() == [0.0, 0.0]  # the stage was consumed


def test_guard_decision_reaches_the_next_step() -> None:
    from vllm_safeguard.integration.alpha_runner import TokenAlphaFiller

    ours, _, _, _ = _wrapper_and_layer()
    filler = TokenAlphaFiller([ours], POLICY)
    requests = {"a": _req(0.0), "b": _req(0.0)}
    _stage(filler, ["a", "b"], requests, np.array([3, 2]))
    assert ours.safeguard_alpha[:5].tolist() == [0.0] * 5
    filler.table.set("b", 1.0)  # the guard flagged request b (its op already set this step's alpha)
    assert _stage(filler, ["b", "a"], requests, np.array([1, 1])).tolist() == [1.0, 0.0]  # next step
    assert ours.safeguard_alpha[:2].tolist() == [1.0, 0.0]


def test_unsupported_modes_are_refused_naming_the_flag() -> None:
    pytest.importorskip("vllm")
    from vllm_safeguard.errors import SafetyPathError
    from vllm_safeguard.integration.alpha_runner import _refuse_unsupported

    def cfg(fully_sharded: bool = False, pp: int = 1) -> Any:
        return SimpleNamespace(
            lora_config=SimpleNamespace(fully_sharded_loras=fully_sharded),
            parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=2),
        )

    _refuse_unsupported(cfg())  # tensor parallelism is supported (layer_table shards the weights)
    with pytest.raises(SafetyPathError, match="--fully-sharded-loras"):
        _refuse_unsupported(cfg(fully_sharded=True))
    with pytest.raises(SafetyPathError, match="--pipeline-parallel-size 2"):
        _refuse_unsupported(cfg(pp=2))
