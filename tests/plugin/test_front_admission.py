"""Admission before the engine (vllm_safeguard.admission.frontend / served_context, and the worker's
check of what it is handed: SafeguardPipeline.handed_over), on the tiny workspace with real pipelines."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from vllm_safeguard.admission.frontend import ContextUnavailable, FrontAdmission
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.admission.served_context import (
    admission_fingerprint,
    context_file,
    publish_context,
    read_context,
)
from vllm_safeguard.config import SafeguardConfig, load_config
from vllm_safeguard.core.adapter_io import WEIGHTS_NAME
from vllm_safeguard.errors import OVERLOADED, AdapterRefused, AdapterValidationError, UnrepairableError
from vllm_safeguard.testing.workspace import Workspace

MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _config(cache_dir: Path, **over: object) -> SafeguardConfig:
    sg = {
        "cache_dir": str(cache_dir),
        "method": "nlsr_datafree",
        "method_options": {"neuron_fraction": 0.5},
        "risk_threshold": 0.1,
        # the pool's initializer sets torch's process-wide thread count: keep the test process's
        "admission_torch_threads": torch.get_num_threads(),
        # threads (the default), so that tests can hold the pipeline's locks (processes: test_child_process_*)
        "admission_process": False,
    }
    return load_config({"safeguard": sg | over}, env={})


def _ctx(ws: Workspace, dtype: torch.dtype = torch.float32) -> PipelineContext:
    return PipelineContext(
        "tiny", ws.base, max_lora_rank=8, expected_modules=set(MODULES), served_dtype=dtype
    )


def _worker(
    ws: Workspace, cache_dir: Path, dtype: torch.dtype = torch.float32, **over: object
) -> SafeguardPipeline:
    """A worker's pipeline that has published its context (what the load_lora_model patch does)."""
    p = SafeguardPipeline.create(_config(cache_dir, **over), _ctx(ws, dtype))
    publish_context(cache_dir, "inst", p.ctx, admission_fingerprint(p))
    return p


# ------------------------------------------------------------------------------ served context


def test_published_context_rebuilds_the_workers_key(workspace: Workspace, cache_dir: Path) -> None:
    worker = _worker(workspace, cache_dir)
    found = read_context(cache_dir, "tiny", "inst")
    assert found is not None
    ctx, fp = found
    assert fp == admission_fingerprint(worker)
    assert ctx.expected_modules == MODULES and ctx.served_dtype == torch.float32 and ctx.max_lora_rank == 8
    front = SafeguardPipeline.create(_config(cache_dir), ctx)
    assert admission_fingerprint(front) == admission_fingerprint(worker)
    # Another engine instance or model name has no context here.
    assert read_context(cache_dir, "tiny", "other") is None
    assert read_context(cache_dir, "other", "inst") is None
    assert context_file(cache_dir, "tiny", "inst").parent == cache_dir / "served"


def test_front_refuses_to_key_differently_from_the_worker(workspace: Workspace, cache_dir: Path) -> None:
    _worker(workspace, cache_dir)  # threshold 0.1
    front = FrontAdmission(_config(cache_dir, risk_threshold=0.2), "tiny", "inst")
    with pytest.raises(ContextUnavailable, match="key adapters differently"):
        front.pipeline()
    roots = FrontAdmission(_config(cache_dir, adapter_roots=[str(workspace.root)]), "tiny", "inst")
    with pytest.raises(ContextUnavailable, match="adapter_roots"):  # path policy differs, keys do not
        roots.pipeline()
    missing = FrontAdmission(_config(cache_dir), "tiny", "no-such-instance")
    with pytest.raises(ContextUnavailable, match="no served context"):
        missing.pipeline()


# ------------------------------------------------------------------------------ hand-over


def test_worker_serves_an_entry_admitted_elsewhere_without_repairing(
    workspace: Workspace, cache_dir: Path
) -> None:
    worker = _worker(workspace, cache_dir)
    front = FrontAdmission(_config(cache_dir), "tiny", "inst")
    out = asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))
    assert out.decision == "repaired" and not out.cache_hit
    assert {"validate", "score", "repair", "verify", "write"} <= set(out.times)
    handed = worker.handed_over(out.path)
    assert handed is not None and handed.cache_hit and handed.key == out.key
    assert handed.decision == "repaired" and set(handed.times) == {"handover"}
    # A path outside the cache is not the hand-over: the worker admits it as usual.
    assert worker.handed_over(workspace.adapters["unsafe"]) is None


def test_worker_refuses_an_entry_admitted_for_another_context(workspace: Workspace, cache_dir: Path) -> None:
    front_side = SafeguardPipeline.create(_config(cache_dir), _ctx(workspace, torch.float32))
    out = front_side.process(workspace.adapters["unsafe"], "unsafe")
    worker = SafeguardPipeline.create(_config(cache_dir), _ctx(workspace, torch.bfloat16))
    with pytest.raises(AdapterValidationError, match="not admitted for this server"):
        worker.handed_over(out.path)
    other_method = SafeguardPipeline.create(_config(cache_dir, risk_threshold=0.2), _ctx(workspace))
    with pytest.raises(AdapterValidationError, match="not admitted for this server"):
        other_method.handed_over(out.path)


def test_worker_refuses_a_tampered_or_made_up_entry(workspace: Workspace, cache_dir: Path) -> None:
    worker = _worker(workspace, cache_dir)
    out = worker.process(workspace.adapters["unsafe"], "unsafe")
    weights = Path(out.path) / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterValidationError, match="tampered or corrupt"):
        worker.handed_over(out.path)
    fake = cache_dir / "repairs" / "entries" / "ab" / "not-a-key"
    fake.mkdir(parents=True)
    with pytest.raises(AdapterValidationError, match="not a verified entry"):
        worker.handed_over(fake)


# ------------------------------------------------------------------------------ the pool


def test_full_pool_refuses_at_once_with_overloaded(workspace: Workspace, cache_dir: Path) -> None:
    _worker(workspace, cache_dir)
    front = FrontAdmission(_config(cache_dir, admission_workers=1, admission_queue=0), "tiny", "inst")
    pipeline = front.pipeline()
    gate = pipeline._name_locks.hold("unsafe")  # the real per-name lock: the first admission waits on it

    async def scenario() -> tuple[object, object]:
        gate.__enter__()
        first = asyncio.ensure_future(front.admit(workspace.adapters["unsafe"], "unsafe"))
        for _ in range(200):  # until it occupies the only slot
            await asyncio.sleep(0.01)
            if front.pending == 1:
                break
        assert front.pending == 1
        second: object
        try:
            await front.admit(workspace.adapters["benign0"], "benign0")
            second = None
        except AdapterRefused as e:
            second = e
        threading.Timer(0.05, gate.__exit__, (None, None, None)).start()
        return await first, second

    first, second = asyncio.run(scenario())
    assert isinstance(second, AdapterRefused) and second.kind == OVERLOADED
    assert "retry later" in str(second) and "limit admission_workers + admission_queue = 1" in str(second)
    assert getattr(first, "decision", None) == "repaired"
    assert front.pending == 0


def test_refusal_is_the_workers_decision(workspace: Workspace, cache_dir: Path) -> None:
    from prometheus_client import REGISTRY

    labels = {"model_name": "tiny", "site": "api_server", "stage": "queue"}
    queued = REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", labels) or 0.0
    _worker(workspace, cache_dir, method_options={"neuron_fraction": 0.1})
    front = FrontAdmission(_config(cache_dir, method_options={"neuron_fraction": 0.1}), "tiny", "inst")
    with pytest.raises(UnrepairableError):
        asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))
    assert front.pending == 0
    # a refused admission waited in the queue too
    assert REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", labels) == queued + 1


def test_stage_metrics_and_cache_gauges(workspace: Workspace, cache_dir: Path) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    _worker(workspace, cache_dir)
    front = FrontAdmission(_config(cache_dir), "tiny", "inst")
    site = {"model_name": "tiny", "site": "api_server"}
    before = {
        s: sample("safeguard_admission_stage_seconds_count", stage=s, **site) for s in ("queue", "repair")
    }
    admitted = sample(
        "safeguard_frontend_admissions_total", model_name="tiny", outcome="repaired", cache="miss"
    )
    asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))
    asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))  # the same bytes: a cache hit
    assert sample("safeguard_admission_stage_seconds_count", stage="queue", **site) == before["queue"] + 2
    assert sample("safeguard_admission_stage_seconds_count", stage="repair", **site) == before["repair"] + 1
    assert (
        sample("safeguard_frontend_admissions_total", model_name="tiny", outcome="repaired", cache="miss")
        == admitted + 1
    )
    assert sample("safeguard_cache_entries", model_name="tiny") == 1
    assert sample("safeguard_cache_bytes", model_name="tiny") > 0


def test_admission_threads_yield_the_cpu(workspace: Workspace, cache_dir: Path) -> None:
    import os

    from vllm_safeguard.admission.frontend import _background_thread

    seen: dict[str, int] = {}

    def probe() -> None:
        _background_thread(7, torch.get_num_threads())
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 7 or seen["nice"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != seen["nice"]  # this thread unchanged


# ------------------------------------------------------------------------------ child processes


def test_child_process_admits_refuses_and_reports_like_a_thread(
    workspace: Workspace, cache_dir: Path
) -> None:
    """admission_process: the same decisions, errors of the same class, metrics in this process."""
    import os

    from prometheus_client import REGISTRY

    worker = _worker(workspace, cache_dir)
    front = FrontAdmission(_config(cache_dir, admission_process=True, admission_nice=5), "tiny", "inst")
    site = {"model_name": "tiny", "site": "api_server"}
    repairs = (
        REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", {"stage": "repair", **site}) or 0
    )
    try:
        out = asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))
        assert out.decision == "repaired" and not out.cache_hit and out.admission is None
        handed = worker.handed_over(out.path)  # the worker accepts what the child wrote
        assert handed is not None and handed.key == out.key
        again = asyncio.run(front.admit(workspace.adapters["unsafe"], "unsafe"))
        assert again.cache_hit and again.path == out.path
        assert (
            REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", {"stage": "repair", **site})
            == repairs + 1
        )
        assert (REGISTRY.get_sample_value("safeguard_cache_entries", {"model_name": "tiny"}) or 0) >= 1
        # The pool's processes are background work; this process is not.
        pids = list(front._pool._processes)  # type: ignore[union-attr]
        assert pids and os.getpid() not in pids
        assert all(
            os.getpriority(os.PRIO_PROCESS, pid) in (os.getpriority(os.PRIO_PROCESS, 0) + 5, 19)
            for pid in pids
        )
        # A refusal in the child arrives as the worker's error class, with its text.
        strict = FrontAdmission(
            _config(cache_dir, admission_process=True, method_options={"neuron_fraction": 0.1}),
            "tiny",
            "inst",
        )
        strict._pool = front._pool  # the same children; another config is another pipeline there
        _worker(workspace, cache_dir, method_options={"neuron_fraction": 0.1})
        queue = {"stage": "queue", **site}
        queued = REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", queue) or 0.0
        with pytest.raises(UnrepairableError, match="risk"):
            asyncio.run(strict.admit(workspace.adapters["unsafe"], "unsafe"))
        assert REGISTRY.get_sample_value("safeguard_admission_stage_seconds_count", queue) == queued + 1
        # No context published for this instance: the child says so, the worker admits.
        orphan = FrontAdmission(_config(cache_dir, admission_process=True), "tiny", "no-such-instance")
        orphan._pool = front._pool
        with pytest.raises(ContextUnavailable, match="no served context"):
            asyncio.run(orphan.admit(workspace.adapters["unsafe"], "unsafe"))
        assert front.pending == strict.pending == orphan.pending == 0
    finally:
        front.close()


def test_a_path_outside_the_adapter_roots_is_refused_and_counted(
    workspace: Workspace, cache_dir: Path
) -> None:
    """The API server's refusal of a path (before any admission) counts as refused_invalid."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from vllm_safeguard.integration import front_admission

    roots = [str(workspace.root / "nowhere")]
    front = FrontAdmission(_config(cache_dir, adapter_roots=roots), "tiny", "inst")
    client = SimpleNamespace(**{front_admission._ATTR: front})
    request = SimpleNamespace(lora_name="escape", lora_path=str(workspace.adapters["unsafe"]))
    labels = {"model_name": "tiny", "outcome": "refused_invalid", "method": "nlsr_datafree"}
    before = REGISTRY.get_sample_value("safeguard_adapter_loads_total", labels) or 0.0

    async def original(client: object, request: object) -> None:
        raise AssertionError("the engine must not see a refused adapter")

    with pytest.raises(AdapterRefused, match="refused \\(invalid\\)"):
        asyncio.run(front_admission.admit_then_add(client, request, original))
    assert REGISTRY.get_sample_value("safeguard_adapter_loads_total", labels) == before + 1
    assert front.pending == 0


def test_child_errors_are_rebuilt_by_kind_with_their_text() -> None:
    from vllm_safeguard.admission.frontend import _Done, _rebuild
    from vllm_safeguard.errors import CoverageError, RepairError, refusal_kind

    def rebuilt(cls: str, kind: str, ours: bool = True) -> Exception:
        return _rebuild(_Done(None, error=(cls, kind, "the text", "n", "why"), ours=ours))

    assert isinstance(rebuilt("AdapterValidationError", "invalid"), AdapterValidationError)
    assert isinstance(rebuilt("CoverageError", "uncovered"), CoverageError)
    assert isinstance(rebuilt("UnrepairableError", "unrepairable"), UnrepairableError)
    timeout = rebuilt("RepairTimeout", "error")
    assert (
        isinstance(timeout, RepairError) and str(timeout) == "the text" and refusal_kind(timeout) == "error"
    )
    bug = rebuilt("ValueError", "error", ours=False)
    assert type(bug) is RuntimeError and str(bug) == "the text"
    refused = rebuilt("AdapterRefused", OVERLOADED)
    assert isinstance(refused, AdapterRefused) and refused.kind == OVERLOADED and refused.reason == "why"
    assert isinstance(rebuilt("ContextUnavailable", "error"), ContextUnavailable)


def test_a_dead_admission_process_drops_only_its_own_pool(cache_dir: Path) -> None:
    """A BrokenProcessPool refuses the admission (kind error) and resets the pool only if it is still the
    current one: a pool a later admission started meanwhile is kept."""
    from concurrent.futures import Executor, Future
    from concurrent.futures.process import BrokenProcessPool

    front = FrontAdmission(_config(cache_dir, admission_process=True), "tiny", "inst")

    class Dead(Executor):
        def __init__(self, replace_with: Executor | None = None) -> None:
            self.replace_with, self.closed = replace_with, False

        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.replace_with is not None:
                front._pool = self.replace_with  # another admission started a new pool meanwhile
            f: Future[object] = Future()
            f.set_exception(BrokenProcessPool("killed"))
            return f

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            self.closed = True

    alone = Dead()
    front._pool = alone
    with pytest.raises(RuntimeError, match="admission process died"):
        asyncio.run(front.admit("/nowhere", "a"))
    assert front._pool is None and alone.closed and front.pending == 0
    newer = Dead()
    stale = Dead(replace_with=newer)
    front._pool = stale
    with pytest.raises(RuntimeError, match="admission process died"):
        asyncio.run(front.admit("/nowhere", "b"))
    assert front._pool is newer and not newer.closed
