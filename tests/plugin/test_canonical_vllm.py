"""What vLLM 0.32's own loader reads is what the plugin read, scored and served (issue 16).

* ``test_vllm_reads_what_the_plugin_scored``: random PEFT folders for the tiny Llama (module subsets,
  ranks 1-8, ``rank_pattern`` / ``alpha_pattern`` with suffix, wildcard-dot and full-path keys in random
  order, rsLoRA, fp16/bf16/fp32, dead rank components, alignment-cancelling updates). (a) The plugin's
  reading of the original folder equals vLLM's (``LoRAModel.from_local_checkpoint`` + ``optimize()``)
  bitwise in fp32, rank and scaling included. (b) Through two admission pipelines (everything valid
  passes / everything is repaired): what vLLM loads from an accepted canonical folder equals
  ``canonical_tensors(served)`` bitwise with scaling exactly 1; a passed adapter is vLLM's own reading
  of the original minus dead components; a refusal is typed and names its reason.
* ``test_unsupported_features_refused_like_vllm``: the early refusals agree with ``PEFTHelper``.
* ``test_pattern_matcher_agrees_with_vllm``: ``rank_pattern`` key matching agrees with vLLM's.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.model_executor.models.llama import LlamaForCausalLM

from vllm_safeguard.admission.canonical import canonical_tensors
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.config import SafeguardConfig, load_config
from vllm_safeguard.core import adapter_io
from vllm_safeguard.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, peft_key
from vllm_safeguard.core.reference import AlignmentReference
from vllm_safeguard.errors import AdapterValidationError, CoverageError, UnrepairableError
from vllm_safeguard.integration.worker_hook import expected_modules as _expected_modules
from vllm_safeguard.testing.tiny import LLAMA_TARGETS
from vllm_safeguard.testing.workspace import VLLM_TINY_SPEC, Workspace

# What vLLM's worker computes for Llama (WorkerLoRAManager._load_adapter): the LinearBase layer names
# plus the model's embedding_modules, packed names expanded by LlamaForCausalLM.packed_modules_mapping.
_SUPPORTED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", *LlamaForCausalLM.embedding_modules]
_MANAGER = SimpleNamespace(
    _adapter_manager=SimpleNamespace(
        supported_lora_modules=_SUPPORTED, packed_modules_mapping=LlamaForCausalLM.packed_modules_mapping
    )
)
EXPECTED = _expected_modules(_MANAGER)
MAPPER = LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
LORA_CONFIG = LoRAConfig(max_lora_rank=8)
SHAPES = {
    **VLLM_TINY_SPEC.module_shapes(),
    "lm_head": (VLLM_TINY_SPEC.vocab_size, VLLM_TINY_SPEC.hidden_size),
}
NAMES = sorted(n for n in SHAPES if n != "lm_head")
ALL_NAMES = [*NAMES, "lm_head", "model.embed_tokens"]
CHARSET = string.ascii_letters + string.digits + "_.-"
REFUSALS = (AdapterValidationError, CoverageError, UnrepairableError)


def test_expected_modules_are_vllms_llama_set() -> None:
    assert {*LLAMA_TARGETS, "embed_tokens", "lm_head"} == set(EXPECTED)


# ---------------------------------------------------------------------------------------- strategies


@st.composite
def pattern_keys(draw: st.DrawFn) -> str:
    """A rank/alpha_pattern key in the allowed charset, biased towards keys that match something."""
    name = draw(st.sampled_from(ALL_NAMES))
    how = draw(st.sampled_from(["suffix", "suffix", "wild", "cut", "random"]))
    if how == "random":
        return draw(st.text(CHARSET, min_size=1, max_size=10))
    if how == "cut":  # a suffix not at a dot boundary ("proj", "_proj", "yers.0.mlp.up_proj")
        return name[draw(st.integers(1, len(name) - 1)) :]
    parts = name.split(".")
    key = ".".join(parts[draw(st.integers(0, len(parts) - 1)) :])
    if how == "wild":  # "." is the regex wildcard: "q.proj", "......", "self.attn.q_proj"
        dots = draw(st.lists(st.integers(0, len(key) - 1), min_size=1, max_size=len(key)))
        key = "".join("." if i in dots else c for i, c in enumerate(key))
    return key


alphas = st.one_of(st.integers(1, 64), st.floats(0.01, 64.0, allow_nan=False, allow_infinity=False))


@st.composite
def adapter_specs(draw: st.DrawFn) -> dict[str, Any]:
    modules = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    if draw(st.integers(0, 7)) == 0:
        modules.append("lm_head")  # valid for the model and for vLLM, but nothing scores it
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "r": draw(st.integers(1, 8)),
        "lora_alpha": draw(alphas),
        "use_rslora": draw(st.booleans()),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
    }
    for field_name, values in (("rank_pattern", st.integers(1, 8)), ("alpha_pattern", alphas)):
        pattern = draw(st.dictionaries(pattern_keys(), values, max_size=4))
        if pattern or draw(st.booleans()):
            cfg[field_name] = pattern  # insertion order = file order = match order
    return {
        "cfg": cfg,
        "modules": modules,
        "dtype": draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "hostile": draw(st.booleans()),  # cancel the reference's alignment directions (risk ~1)
        # per module: -1 no dead component, else the index (mod rank) of a zero A row / zero B column;
        # "all" zeroes every A row (a zero update)
        "dead": [draw(st.sampled_from([-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, "all"])) for _ in modules],
        "dead_side": [draw(st.sampled_from("AB")) for _ in modules],
    }


def write_folder(folder: Path, spec: dict[str, Any], ref: AlignmentReference) -> None:
    """A PEFT folder written by hand; each module's rank is what vLLM's PEFTHelper says it is."""
    cfg = spec["cfg"]
    helper = PEFTHelper.from_dict(cfg)
    g = torch.Generator().manual_seed(spec["seed"])
    tensors: dict[str, torch.Tensor] = {}
    for name, dead, side in zip(spec["modules"], spec["dead"], spec["dead_side"], strict=True):
        rank, scaling = helper.get_rank_and_scaling(name)
        out_f, in_f = SHAPES[name]
        a = torch.randn(rank, in_f, generator=g) * 0.1
        b = torch.randn(out_f, rank, generator=g) * 0.1
        sub = ref.modules.get(name)
        if spec["hostile"] and sub is not None:
            k = min(rank, sub.rank)
            a[:k] = sub.vh[:k]
            b[:, :k] = -(sub.u[:, :k] * sub.s[:k]) / scaling
        if dead == "all":
            a.zero_()
        elif dead >= 0 and side == "A":
            a[dead % rank] = 0
        elif dead >= 0:
            b[:, dead % rank] = 0
        tensors[peft_key(name, "A")] = a.to(spec["dtype"]).contiguous()
        tensors[peft_key(name, "B")] = b.to(spec["dtype"]).contiguous()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def vllm_load(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[PEFTHelper, LoRAModel]:
    """vLLM 0.32's worker path: PEFTHelper.from_local_dir + validate_legal + from_local_checkpoint
    (``dtype``: vLLM's LoRA dtype, the model's by default)."""
    helper = PEFTHelper.from_local_dir(str(folder), None)
    helper.validate_legal(LORA_CONFIG)
    lora = LoRAModel.from_local_checkpoint(
        str(folder),
        EXPECTED,
        peft_helper=helper,
        lora_model_id=1,
        device="cpu",
        dtype=dtype,
        weights_mapper=MAPPER,
    )
    return helper, lora


# ---------------------------------------------------------------------------------------- fixtures


def _pipeline(ws: Workspace, cache_dir: Path, threshold: float, **over: Any) -> SafeguardPipeline:
    section = {
        "cache_dir": str(cache_dir),
        "cache_enabled": False,  # a private folder per load, with .admission
        "method": "nlsr_datafree",
        "method_options": {"neuron_fraction": 0.5},
        "risk_threshold": threshold,
        **over,
    }
    cfg = load_config({"safeguard": section}, env={})
    ctx = PipelineContext(
        "tiny", ws.base, max_lora_rank=8, expected_modules=set(EXPECTED), served_dtype=torch.float32
    )
    return SafeguardPipeline.create(cfg, ctx)


class Setup:
    """The module's pipelines and reference (a short repr keeps hypothesis' reports readable)."""

    def __init__(self, ws: Workspace, root: Path) -> None:
        # no served-risk cap where the config has one: every valid adapter must pass
        uncapped = {"max_served_risk": None} if "max_served_risk" in SafeguardConfig.model_fields else {}
        self.pipelines = {
            "pass": _pipeline(ws, root / "pass", 1e9, **uncapped),
            "repair": _pipeline(ws, root / "repair", 0.0),  # every adapter goes through the repair
        }
        self.reference = AlignmentReference.load(ws.reference)

    def __repr__(self) -> str:
        return "<setup>"


@pytest.fixture(scope="module")
def setup(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(workspace, tmp_path_factory.mktemp("canonical-vllm"))


# ---------------------------------------------------------------------------------------- property


def _live(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != 0).any(dim=1) & (b != 0).any(dim=0)


def check_accepted(outcome: Any, original: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    served = outcome.admission.served
    expected = canonical_tensors(served)
    rank = max(m.rank for m in served.modules.values())
    with safe_open(str(outcome.path / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(expected)
    helper, lora = vllm_load(outcome.path)
    assert helper._validate_features() == [] and helper.r == rank
    assert set(lora.loras) == set(served.modules) and len(lora.loras) == outcome.modules
    for name, w in lora.loras.items():
        assert w.rank == rank and w.scaling == 1.0, (name, w.rank, w.scaling)
        assert w.optimize() is w
        assert w.lora_a.dtype == torch.float32 and w.lora_b.dtype == torch.float32
        assert torch.equal(w.lora_a, expected[peft_key(name, "A")]), name
        assert torch.equal(w.lora_b, expected[peft_key(name, "B")]), name
    live_modules = {n for n, (a, b) in original.items() if _live(a, b).any()}
    assert set(served.modules) <= live_modules
    if outcome.decision != "passed":
        return
    # Passed: vLLM serves the update vLLM would have served from the original, re-factored into its SVD
    # factors (canonical.py: no cancelling components survive), so the product is equal up to fp32
    # rounding of the QR/SVD, and its rank never grows.
    assert set(served.modules) == live_modules
    for name, w in lora.loras.items():
        a0, b0 = original[name]
        live = _live(a0, b0)
        assert int(w.lora_a.any(dim=1).sum()) <= int(live.sum()), name
        want = b0.double() @ a0.double()
        got = w.lora_b.double() @ w.lora_a.double()
        assert float((got - want).norm()) <= 1e-5 * float(want.norm()) + 1e-30, name


def check_refused(error: Exception, which: str, live_modules: set[str]) -> None:
    msg = str(error)
    assert msg.strip(), type(error)
    if not live_modules:
        assert isinstance(error, AdapterValidationError) and "zero" in msg, msg
    elif "lm_head" in live_modules:
        assert isinstance(error, CoverageError) and "lm_head" in msg, msg
    else:
        # Every other adapter is valid: it passes below a huge threshold, and is refused only as
        # unrepairable (naming the risk) when every adapter must be repaired.
        assert which == "repair", f"valid adapter refused: {msg}"
        assert isinstance(error, UnrepairableError) and re.search("risk|repair", msg), msg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=adapter_specs())
def test_vllm_reads_what_the_plugin_scored(spec: dict[str, Any], setup: Setup) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        write_folder(folder, spec, setup.reference)

        # (a) the original folder: the plugin's reading == vLLM's, bitwise in fp32.
        ours = load_adapter(folder, base_shapes=SHAPES)
        helper, lora = vllm_load(folder)
        assert set(ours.modules) == set(lora.loras) == set(spec["modules"])
        original: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, w in lora.loras.items():
            mine = ours.modules[name]
            rank, scaling = helper.get_rank_and_scaling(name)
            assert adapter_io.module_rank(ours.config, name) == rank == w.rank == mine.rank, name
            assert adapter_io.module_scaling(ours.config, name) == scaling == w.scaling == mine.scaling, name
            assert w.lora_a.dtype == torch.float32 and torch.equal(mine.lora_a, w.lora_a), name
            w.optimize()  # vLLM folds the scaling into lora_b (in place, fp32)
            assert torch.equal(mine.scaled_b(), w.lora_b), name
            original[name] = (w.lora_a, w.lora_b)
        live_modules = {n for n, (a, b) in original.items() if _live(a, b).any()}

        # (b) through admission: what vLLM loads from the canonical folder == what the plugin served.
        for which, pipeline in setup.pipelines.items():
            try:
                outcome = pipeline.process(folder, "adapter")
            except REFUSALS as e:
                event(f"{which}: refused {type(e).__name__}")
                check_refused(e, which, live_modules)
                continue
            event(f"{which}: {outcome.decision}")
            try:
                assert not outcome.cache_hit and outcome.admission is not None
                assert which == "repair" or outcome.decision == "passed"
                assert "lm_head" not in live_modules and live_modules
                check_accepted(outcome, original)
            finally:
                assert outcome.cleanup is not None
                outcome.cleanup()


# ---------------------------------------------------------------------------------------- early refusals

_BASE_CFG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}

UNSUPPORTED = [
    ("bias", "all"),
    ("bias", "lora_only"),
    ("lora_bias", True),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "PiSSA"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "corda"),
    ("use_dora", True),
    ("use_qalora", True),
    ("alora_invocation_tokens", [1]),
    ("use_bdlora", {"block_size": 4}),
    ("layer_replication", [[0, 1]]),
    ("modules_to_save", ["lm_head"]),
]
SUPPORTED = [
    ("init_lora_weights", True),
    ("init_lora_weights", False),
    ("init_lora_weights", "gaussian"),
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "orthogonal"),
    ("init_lora_weights", "mica"),
    ("init_lora_weights", "lora_ga"),
    ("lora_bias", False),
    ("use_qalora", False),
    ("use_dora", False),
    ("bias", "none"),
    ("modules_to_save", None),
    ("alora_invocation_tokens", None),
    ("layer_replication", None),
    ("use_bdlora", None),
]


def _read_config(tmp_path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(cfg))
    return adapter_io.read_adapter_config(path)


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED, ids=lambda v: repr(v))
def test_unsupported_features_refused_like_vllm(tmp_path: Path, field: str, value: Any) -> None:
    cfg = {**_BASE_CFG, field: value}
    helper = PEFTHelper.from_dict(cfg)
    assert field == "bias" or helper._validate_features(), "vLLM accepts it: the parity list is stale"
    with pytest.raises(ValueError):
        helper.validate_legal(LORA_CONFIG)
    with pytest.raises(AdapterValidationError) as info:
        _read_config(tmp_path, cfg)
    assert info.value.key == field and field in str(info.value)


@pytest.mark.parametrize(("field", "value"), SUPPORTED, ids=lambda v: repr(v))
def test_supported_features_accepted_like_vllm(tmp_path: Path, field: str, value: Any) -> None:
    cfg = {**_BASE_CFG, field: value}
    helper = PEFTHelper.from_dict(cfg)
    assert helper._validate_features() == []
    helper.validate_legal(LORA_CONFIG)
    assert _read_config(tmp_path, cfg)[field] == value


# ---------------------------------------------------------------------------------------- matcher


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(pattern_keys(), min_size=1, max_size=5, unique=True), rslora=st.booleans())
def test_pattern_matcher_agrees_with_vllm(keys: list[str], rslora: bool) -> None:
    assert all(adapter_io._PATTERN_KEY_RE.match(k) for k in keys)  # the plugin reads such keys
    ranks = {k: i + 1 for i, k in enumerate(keys)}  # first match wins: the value names the key
    alphas = {k: 10.0 * (i + 1) for i, k in enumerate(reversed(keys))}
    cfg = {**_BASE_CFG, "r": 7, "use_rslora": rslora, "rank_pattern": ranks, "alpha_pattern": alphas}
    helper = PEFTHelper.from_dict(cfg)
    for name in ALL_NAMES:
        assert adapter_io._pattern_value(ranks, name, None) == PEFTHelper._match_pattern(ranks, name), name
        rank, scaling = helper.get_rank_and_scaling(name)
        assert adapter_io.module_rank(cfg, name) == rank, name
        assert adapter_io.module_scaling(cfg, name) == scaling, name
