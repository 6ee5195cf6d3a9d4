"""The worker-side hook around ``WorkerLoRAManager._load_adapter``, with vLLM's real LoRARequest and a
stand-in for vLLM's loader (the end-to-end tests run the real one)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.exceptions import LoRAAdapterNotFoundError
from vllm.lora.request import LoRARequest

from vllm_safeguard.errors import AdapterRefused, refusal_text
from vllm_safeguard.integration.worker_hook import STATE_ATTR, attach_worker, load_adapter_hook
from vllm_safeguard.testing.workspace import Workspace


def vllm_config(ws: Workspace, cache_dir: Path, **safeguard: Any) -> SimpleNamespace:
    nlsr = {"method": "nlsr_datafree", "method_options": {"neuron_fraction": 0.5}, "risk_threshold": 0.1}
    sg = {"cache_dir": str(cache_dir), **nlsr, **safeguard}
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(ws.base), served_model_name="tiny"),
        lora_config=SimpleNamespace(max_lora_rank=8),
        additional_config={"safeguard": sg},
    )


class Loader:
    """Records what vLLM's loader would have been asked to read."""

    def __init__(self, modules: int | None = None) -> None:
        self.paths: list[str] = []
        self.modules = modules

    def __call__(self, manager: object, req: LoRARequest) -> SimpleNamespace:
        self.paths.append(req.lora_path)
        from vllm_safeguard.core.adapter_io import load_adapter

        n = self.modules if self.modules is not None else len(load_adapter(req.lora_path).modules)
        return SimpleNamespace(loras={f"m{i}": None for i in range(n)})


def test_hook_hands_vllm_the_repaired_copy(workspace: Workspace, cache_dir: Path) -> None:
    mgr = SimpleNamespace()
    state = attach_worker(mgr, vllm_config(workspace, cache_dir))
    assert state.pipeline is not None and getattr(mgr, STATE_ATTR) is state
    loader = Loader()
    req = LoRARequest("unsafe", 1, str(workspace.adapters["unsafe"]))
    load_adapter_hook(mgr, req, loader)
    assert loader.paths[0].startswith(str(cache_dir)) and loader.paths[0] != req.lora_path
    assert req.lora_path == str(workspace.adapters["unsafe"])  # the caller's request is untouched


def test_hook_refuses_hostile_with_delimited_message(workspace: Workspace, cache_dir: Path) -> None:
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir))
    loader = Loader()
    with pytest.raises(AdapterRefused) as ei:
        load_adapter_hook(mgr, LoRARequest("hostile", 2, str(workspace.adapters["hostile"])), loader)
    assert loader.paths == []  # vLLM never opened it
    text = refusal_text(f"Worker failed with error '{ei.value}', see above")
    assert text is not None and "hostile" in text and "data_offsets" in text


def test_hook_refuses_when_vllm_drops_modules(workspace: Workspace, cache_dir: Path) -> None:
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir))
    with pytest.raises(AdapterRefused, match="loaded 3 of the 14"):
        load_adapter_hook(mgr, LoRARequest("u", 3, str(workspace.adapters["unsafe"])), Loader(modules=3))


def test_missing_folder_is_vllms_404(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir))
    with pytest.raises(LoRAAdapterNotFoundError):
        load_adapter_hook(mgr, LoRARequest("x", 4, str(tmp_path / "nope")), Loader())


def test_broken_setup_refuses_every_adapter(workspace: Workspace, cache_dir: Path, tmp_path: Path) -> None:
    mgr = SimpleNamespace()
    state = attach_worker(mgr, vllm_config(workspace, cache_dir, reference_path=str(tmp_path / "none")))
    assert state.pipeline is None and state.error is not None
    with pytest.raises(AdapterRefused, match="no alignment reference"):
        load_adapter_hook(mgr, LoRARequest("b", 5, str(workspace.adapters["benign0"])), Loader())
    mgr2 = SimpleNamespace()
    state2 = attach_worker(mgr2, vllm_config(workspace, cache_dir, risk_threshold="high"))
    assert state2.config is None and "risk_threshold" in (state2.error or "")
    with pytest.raises(AdapterRefused, match="'high'"):
        load_adapter_hook(mgr2, LoRARequest("b", 5, str(workspace.adapters["benign0"])), Loader())
    with pytest.raises(AdapterRefused, match="not initialised"):
        load_adapter_hook(
            SimpleNamespace(), LoRARequest("b", 5, str(workspace.adapters["benign0"])), Loader()
        )


def test_disabled_delegates_unchanged(workspace: Workspace, cache_dir: Path) -> None:
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir, enabled=False))
    loader = Loader()
    req = LoRARequest("u", 6, str(workspace.adapters["unsafe"]))
    load_adapter_hook(mgr, req, loader)
    assert loader.paths == [req.lora_path]


def test_fail_open_serves_original_only_when_processing_failed(workspace: Workspace, cache_dir: Path) -> None:
    mgr = SimpleNamespace()
    state = attach_worker(mgr, vllm_config(workspace, cache_dir, fail_closed=False))
    loader = Loader(modules=1)
    # A decision (here: invalid) is never overridden by fail_closed=false.
    with pytest.raises(AdapterRefused, match="refused \\(invalid\\)"):
        load_adapter_hook(mgr, LoRARequest("h", 7, str(workspace.adapters["hostile"])), loader)
    assert loader.paths == []

    def broken(*_: object) -> None:
        raise RuntimeError("repair backend crashed")

    assert state.pipeline is not None
    state.pipeline.process = broken  # type: ignore[method-assign]
    load_adapter_hook(mgr, LoRARequest("b", 8, str(workspace.adapters["benign0"])), loader)
    assert loader.paths == [str(workspace.adapters["benign0"])]


def test_eviction_reload_uses_the_admitted_copy_never_the_source(
    workspace: Workspace, cache_dir: Path, tmp_path: Path
) -> None:
    import shutil

    src = shutil.copytree(workspace.adapters["unsafe"], tmp_path / "src")
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir))
    loader = Loader()
    req = LoRARequest("u", 9, str(src))
    load_adapter_hook(mgr, req, loader)
    admitted = loader.paths[0]
    # The source is replaced by hostile bytes, then deleted: the same request reloads the admitted copy.
    shutil.rmtree(src)
    shutil.copytree(workspace.adapters["hostile"], src)
    load_adapter_hook(mgr, req, loader, in_step=True)
    shutil.rmtree(src)
    load_adapter_hook(mgr, req, loader)
    assert loader.paths == [admitted] * 3
    # A new load (vLLM gives it a new int id) reads the (now missing) source afresh: vLLM's 404.
    with pytest.raises(LoRAAdapterNotFoundError):
        load_adapter_hook(mgr, LoRARequest("u", 10, str(src)), loader)


def test_lost_admitted_copy_never_raises_inside_the_engine_step(
    workspace: Workspace, cache_dir: Path
) -> None:
    import shutil

    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache_dir))
    loader = Loader()
    req = LoRARequest("u", 11, str(workspace.adapters["unsafe"]))
    load_adapter_hook(mgr, req, loader)
    shutil.rmtree(loader.paths[0])  # the cache entry is gone
    with pytest.raises(AdapterRefused, match="admitted canonical copy is gone"):
        load_adapter_hook(mgr, req, loader)  # outside a step (runtime load): a clear refusal
    empty = load_adapter_hook(mgr, req, loader, in_step=True)  # inside a step: no raise, no bytes
    assert empty.loras == {} and empty.id == 11
    # A refusal of a never-admitted adapter inside a step does not raise either.
    hostile = load_adapter_hook(
        mgr, LoRARequest("h", 12, str(workspace.adapters["hostile"])), loader, in_step=True
    )
    assert hostile.loras == {}
    assert len(loader.paths) == 1
