"""Regression tests for the attacks a review of the admission redesign found (one test per finding).

1. fp32-cancelling rank components that un-cancel once a bf16 server casts them: the canonical form is
   the SVD of the update rounded to the served dtype, so vLLM's cast changes nothing.
2. A repair that fails after admission decided "this needs a repair" is a refusal, also with
   ``fail_closed=false`` (never a fall-back to the caller's folder).
3. Gram sums of cancelling components rounding below zero: no NaN norm, no complex similarity.
4. ``load_inplace`` re-admits the folder's new bytes instead of serving the old binding.
5. Tensor-parallel workers of one engine admit once: the second worker serves the first's entry.
6. An embedding LoRA cannot be admitted through ``coverage_allow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm_safeguard.admission.canonical import canonicalize, update_norm
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.config import load_config
from vllm_safeguard.core.adapter import LoRAAdapter, LoRAModule
from vllm_safeguard.core.adapter_io import save_adapter
from vllm_safeguard.errors import CoverageError, UnrepairableError
from vllm_safeguard.methods import safelora_subspace
from vllm_safeguard.testing.workspace import Workspace

NLSR = {"method": "nlsr_datafree", "method_options": {"neuron_fraction": 0.5}, "risk_threshold": 0.1}


def _cancelling_pair(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, 2], A [2, in] with (3m) a^T + (-m) (3a)^T == 0 exactly in fp32, but not once each
    factor is rounded to bf16 (m has 9 significant bits: bf16 keeps 8)."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.randint(257, 511, (out_f,), generator=g) * 2).float() * 2.0**-4  # 9 bits, odd mantissa
    a = torch.randint(1, 8, (in_f,), generator=g).float() * 2.0**-4  # 3 bits: a, 3a exact
    b = torch.stack([3 * m, -m], 1)
    aa = torch.stack([a, 3 * a], 0)
    return b, aa


def test_components_cancelling_in_fp32_do_not_survive_a_bf16_cast() -> None:
    b, a = _cancelling_pair(48, 32)
    assert float((b @ a).abs().max()) == 0.0  # exactly zero in fp32: what a naive scorer sees
    assert float((b.bfloat16().float() @ a.bfloat16().float()).abs().max()) > 0.1  # what bf16 holds
    cover_b, cover_a = torch.randn(48, 1), torch.randn(1, 32)
    mod = LoRAModule("m", torch.cat([a, cover_a]), torch.cat([b, cover_b], 1), 1.0)
    c = canonicalize(LoRAAdapter({}, {"m": mod}), torch.bfloat16).modules["m"]
    for t in (c.lora_a, c.lora_b):  # vLLM's cast to bf16 is exact: scored == applied
        assert torch.equal(t.bfloat16().float(), t)
    # What the server holds is the update that was scored (the cover), not the un-cancelled pair.
    held = c.lora_b.bfloat16().float() @ c.lora_a.bfloat16().float()
    assert float((held - cover_b @ cover_a).abs().max()) < 0.05 * float((cover_b @ cover_a).abs().max())


def test_failed_repair_is_a_refusal_even_fail_open(
    workspace: Workspace, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_safeguard import methods

    def broken(*_: Any, **__: Any) -> Any:
        raise TypeError("'<' not supported between instances of 'complex' and 'float'")

    monkeypatch.setattr(methods, "repair", broken)
    cfg = load_config({"safeguard": {"cache_dir": str(cache_dir), **NLSR, "fail_closed": False}}, env={})
    p = SafeguardPipeline.create(cfg, PipelineContext("tiny", workspace.base, max_lora_rank=8))
    with pytest.raises(UnrepairableError, match="needs a repair and the repair failed"):
        p.process(workspace.adapters["unsafe"], "u")


def test_gram_rounding_below_zero_is_neither_nan_nor_complex() -> None:
    b, a = _cancelling_pair(48, 32)
    b = b + 1e-6 * torch.randn_like(b)  # ~0 update, large factors: the Gram sum rounds around zero
    mod = LoRAModule("m", a, b, 1.0)
    norm = update_norm(mod)
    assert norm == norm and norm >= 0.0  # not NaN
    sim = safelora_subspace.similarity(mod, torch.linalg.qr(torch.randn(48, 4))[0])
    assert isinstance(sim, float) and 0.0 <= sim <= 1.0


def _worker(ws: Workspace, cache_dir: Path, instance: str = "engine-1") -> SimpleNamespace:
    from vllm_safeguard.integration.worker_hook import attach_worker

    mgr = SimpleNamespace()
    attach_worker(
        mgr,
        SimpleNamespace(
            model_config=SimpleNamespace(model=str(ws.base), served_model_name="tiny"),
            lora_config=SimpleNamespace(max_lora_rank=8),
            additional_config={"safeguard": {"cache_dir": str(cache_dir), **NLSR}},
            instance_id=instance,
        ),
    )
    return mgr


class Loader:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, manager: object, req: Any) -> SimpleNamespace:
        from vllm_safeguard.core.adapter_io import load_adapter

        self.paths.append(req.lora_path)
        return SimpleNamespace(loras=dict.fromkeys(load_adapter(req.lora_path).modules))


def test_load_inplace_admits_the_new_bytes(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.integration.worker_hook import load_adapter_hook

    src = shutil.copytree(workspace.adapters["benign0"], tmp_path / "src")
    mgr, loader = _worker(workspace, cache_dir), Loader()
    load_adapter_hook(mgr, LoRARequest("a", 1, str(src)), loader)
    shutil.rmtree(src)
    shutil.copytree(workspace.adapters["benign1"], src)
    load_adapter_hook(mgr, LoRARequest("a", 1, str(src)), loader)  # eviction reload: the old bytes
    load_adapter_hook(mgr, LoRARequest("a", 1, str(src), load_inplace=True), loader)  # the new ones
    assert loader.paths[0] == loader.paths[1] != loader.paths[2]


def test_tensor_parallel_workers_admit_once(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.integration.worker_hook import load_adapter_hook

    src = shutil.copytree(workspace.adapters["benign0"], tmp_path / "src")
    rank0, rank1, loader = _worker(workspace, cache_dir), _worker(workspace, cache_dir), Loader()
    req = LoRARequest("a", 1, str(src))
    load_adapter_hook(rank0, req, loader)
    shutil.rmtree(src)  # swapped between the two workers' reads: the second never reads it
    shutil.copytree(workspace.adapters["unsafe"], src)
    load_adapter_hook(rank1, req, loader)
    assert loader.paths[0] == loader.paths[1]
    # Another engine instance (a restarted server: int ids start at 1 again) admits afresh.
    other = _worker(workspace, cache_dir, instance="engine-2")
    load_adapter_hook(other, req, loader)
    assert loader.paths[2] != loader.paths[0]


def test_embedding_lora_cannot_be_allowed(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    from vllm_safeguard.core.model_files import module_shapes_from_model_dir

    out_f, in_f = module_shapes_from_model_dir(workspace.base)["model.embed_tokens"]
    emb = LoRAModule("model.embed_tokens", torch.randn(2, in_f) * 0.01, torch.randn(out_f, 2) * 0.01)
    save_adapter(
        LoRAAdapter({"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"]}, {emb.name: emb}),
        tmp_path / "e",
    )
    sg = {"cache_dir": str(cache_dir), **NLSR, "coverage_allow": ["*embed_tokens"]}
    p = SafeguardPipeline.create(
        load_config({"safeguard": sg}, env={}), PipelineContext("tiny", workspace.base, 8)
    )
    with pytest.raises(CoverageError, match="embedding LoRA"):
        p.process(tmp_path / "e", "e")
