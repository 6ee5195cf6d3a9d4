"""Issue 8 hardening, without a server: path containment in the hook and the API patch, per-name
locking (same bytes repair once across threads and processes), repair timeouts and failures, cache
tampering/truncation and crashes mid-write."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from vllm_safeguard import methods as methods_mod
from vllm_safeguard.admission import limits
from vllm_safeguard.admission.limits import RepairTimeout, run_with_deadline
from vllm_safeguard.admission.locks import NameLocks
from vllm_safeguard.admission.pipeline import PipelineContext, SafeguardPipeline
from vllm_safeguard.config import load_config
from vllm_safeguard.errors import ConfigError
from vllm_safeguard.methods import METHODS, Method, MethodOutput, register_method
from vllm_safeguard.testing.attacks import PATH_ATTACKS, PathAttack
from vllm_safeguard.testing.workspace import Workspace

# ----------------------------------------------------------------------------------------- helpers

# NLSR transplanting half of each module's neurons repairs the tiny workspace's unsafe adapter below
# max_served_risk (its default 10% leaves risk 0.68: refused as unrepairable).
NLSR = {"method": "nlsr_datafree", "method_options": {"neuron_fraction": 0.5}, "risk_threshold": 0.0}


def make(ws: Workspace, cache_dir: Path, **over: object) -> SafeguardPipeline:
    cfg = load_config({"safeguard": {"cache_dir": str(cache_dir), **NLSR, **over}}, env={})
    return SafeguardPipeline.create(cfg, PipelineContext("tiny", ws.base, max_lora_rank=8))


def vllm_config(ws: Workspace, cache_dir: Path, **safeguard: Any) -> SimpleNamespace:
    sg = {"cache_dir": str(cache_dir), **NLSR, **safeguard}
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(ws.base), served_model_name="tiny"),
        lora_config=SimpleNamespace(max_lora_rank=8),
        additional_config={"safeguard": sg},
    )


def loader(manager: object, req: Any) -> SimpleNamespace:
    """Stand-in for vLLM's loader: reads what it is handed (must be the repaired copy)."""
    from vllm_safeguard.core.adapter_io import load_adapter

    return SimpleNamespace(loras=dict.fromkeys(load_adapter(req.lora_path).modules))


class Counter:
    """Wraps ``methods.repair`` (what the pipeline calls) and counts calls."""

    def __init__(self, real: Callable[..., Any], delay: float = 0.0) -> None:
        self.real, self.delay, self.calls = real, delay, 0
        self._lock = threading.Lock()

    def __call__(self, *a: Any, **k: Any) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)  # widen the race window
        return self.real(*a, **k)


@pytest.fixture()
def roots(tmp_path: Path, workspace: Workspace) -> Path:
    """``adapters/good`` (a copy of the unsafe adapter), a sibling ``adapters_evil``, ``outside``."""
    r = tmp_path / "adapters"
    r.mkdir()
    shutil.copytree(workspace.adapters["unsafe"], r / "good")
    shutil.copytree(workspace.adapters["unsafe"], tmp_path / "adapters_evil" / "adapter")
    shutil.copytree(workspace.adapters["unsafe"], tmp_path / "outside")
    return r


# ------------------------------------------------------------------------------- path containment


def test_config_adapter_roots_and_timeout_from_env(tmp_path: Path) -> None:
    cfg = load_config(env={"SAFEGUARD_ADAPTER_ROOTS": f"{tmp_path}/a{os.pathsep}{tmp_path}/b"})
    assert cfg.adapter_roots == [tmp_path / "a", tmp_path / "b"]
    assert load_config(env={}).adapter_roots == []
    assert load_config(env={"SAFEGUARD_REPAIR_TIMEOUT_S": ""}).repair_timeout_s is None
    assert load_config(env={"SAFEGUARD_REPAIR_TIMEOUT_S": "2.5"}).repair_timeout_s == 2.5
    with pytest.raises(ConfigError, match="absolute"):
        load_config(env={"SAFEGUARD_ADAPTER_ROOTS": "relative/dir"})
    with pytest.raises(ConfigError, match="repair_timeout_s"):
        load_config(env={"SAFEGUARD_REPAIR_TIMEOUT_S": "0"})


@pytest.mark.parametrize("attack", PATH_ATTACKS, ids=[a.name for a in PATH_ATTACKS])
def test_hook_refuses_path_attacks(
    attack: PathAttack, roots: Path, workspace: Workspace, tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    from vllm_safeguard.errors import AdapterRefused
    from vllm_safeguard.integration.worker_hook import attach_worker, load_adapter_hook

    if attack.symlink_target is not None:
        os.symlink(attack.symlink_target, roots / attack.request_path)
    mgr = SimpleNamespace()
    # fail_closed=False too: a path outside the roots is refused whatever the repair policy says
    attach_worker(
        mgr, vllm_config(workspace, tmp_path / "cache", adapter_roots=[str(roots)], fail_closed=False)
    )
    seen: list[str] = []
    with pytest.raises(AdapterRefused) as info:
        # a plain namespace: vLLM's LoRARequest itself refuses an empty path before we could
        load_adapter_hook(
            mgr, SimpleNamespace(lora_name="x", lora_path=attack.resolve(roots)), lambda m, r: seen.append(r)
        )
    assert attack.expected in str(info.value)
    assert not seen  # vLLM's loader never ran


def test_hook_accepts_names_inside_the_roots(roots: Path, workspace: Workspace, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.errors import AdapterRefused
    from vllm_safeguard.integration.worker_hook import attach_worker, load_adapter_hook

    cache = tmp_path / "cache"
    mgr = SimpleNamespace()
    attach_worker(mgr, vllm_config(workspace, cache, adapter_roots=[str(roots)]))
    for i, path in enumerate(["good", str(roots / "good"), "good/../good"]):
        lora = load_adapter_hook(mgr, LoRARequest(f"g{i}", i + 1, path), loader)
        assert lora.loras
    # the same bytes outside the root are refused (absolute name outside every root)
    with pytest.raises(AdapterRefused, match="escapes the allowed adapter roots"):
        load_adapter_hook(mgr, LoRARequest("o", 9, str(tmp_path / "outside")), loader)


def test_api_server_refuses_outside_roots_before_the_engine(roots: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_safeguard.integration.api_server import early_path_refusal as _early_path_refusal
    from vllm_safeguard.integration.patching import _unwrap

    original = _unwrap(OpenAIServingModels.load_lora_adapter)
    serving = SimpleNamespace(
        engine_client=SimpleNamespace(
            vllm_config=SimpleNamespace(additional_config={"safeguard": {"adapter_roots": [str(roots)]}})
        )
    )
    req = SimpleNamespace(lora_name="evil", lora_path="../outside")
    err = _early_path_refusal(serving, req, original)
    assert err is not None and err.error.code == 400
    assert "escapes the allowed adapter roots" in err.error.message and "'evil'" in err.error.message
    assert _early_path_refusal(serving, SimpleNamespace(lora_name="ok", lora_path="good"), original) is None
    unrestricted = SimpleNamespace(
        engine_client=SimpleNamespace(vllm_config=SimpleNamespace(additional_config={}))
    )
    assert _early_path_refusal(unrestricted, req, original) is None  # no roots: no restriction


# ------------------------------------------------------------------------------------ concurrency


def test_name_locks_serialize_one_name_and_forget_idle_names() -> None:
    locks = NameLocks()
    inside: list[str] = []
    overlap = []

    def work(name: str) -> None:
        with locks.hold(name):
            if name in inside:
                overlap.append(name)
            inside.append(name)
            time.sleep(0.02)
            inside.remove(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in ["a"] * 5 + ["b"] * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not overlap and len(locks) == 0


def test_concurrent_threads_same_bytes_repair_once(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter(methods_mod.repair, delay=0.3)
    monkeypatch.setattr(methods_mod, "repair", counter)
    p = make(workspace, tmp_path / "cache")
    copies = [shutil.copytree(workspace.adapters["unsafe"], tmp_path / f"copy{i}") for i in range(3)]
    # same name + same folder, different names + same folder, different names + byte copies
    jobs = [("same", workspace.adapters["unsafe"])] * 3 + [
        (f"n{i}", workspace.adapters["unsafe"]) for i in range(3)
    ]
    jobs += [(f"c{i}", c) for i, c in enumerate(copies)]
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = []

    def run(name: str, path: Path) -> None:
        barrier.wait()
        results.append(p.process(path, name))

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(jobs)
    assert counter.calls == 1
    assert len({r.key for r in results}) == 1 and len({str(r.path) for r in results}) == 1
    assert sum(not r.cache_hit for r in results) == 1
    assert all(r.decision == "repaired" for r in results)


def _process_loader(ws_root: str, cache: str, count_file: str, barrier: Any, out: Any) -> None:
    from vllm_safeguard import methods as m
    from vllm_safeguard.testing.workspace import prepare_tiny_workspace

    ws = prepare_tiny_workspace(ws_root)  # complete already: reused
    real = m.repair

    def counting(*a: Any, **k: Any) -> Any:
        with open(count_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return real(*a, **k)

    m.repair = counting  # type: ignore[assignment]
    p = make(ws, Path(cache))
    barrier.wait()
    r = p.process(ws.adapters["unsafe"], f"p{os.getpid()}")
    out.put((r.key, r.cache_hit, r.decision))


def test_concurrent_processes_same_bytes_repair_once(workspace: Workspace, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    n = 3
    barrier, out = ctx.Barrier(n), ctx.Queue()
    count_file = tmp_path / "repairs.txt"
    args = (str(workspace.root), str(tmp_path / "cache"), str(count_file), barrier, out)
    procs = [ctx.Process(target=_process_loader, args=args) for _ in range(n)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert len(count_file.read_text().split()) == 1  # one repair in all processes
    assert len({r[0] for r in results}) == 1 and sum(not r[1] for r in results) == 1


# ----------------------------------------------------------------------------------------- faults


class _NoOptions(BaseModel):
    pass


@pytest.fixture()
def test_method(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[str, Callable[..., MethodOutput]], str]]:
    """Register test-only methods (``register_method``) and let the config accept their names."""
    added: list[str] = []

    def add(name: str, run: Callable[..., MethodOutput]) -> str:
        register_method(Method(name, _NoOptions, run))
        added.append(name)
        return name

    yield add
    for name in added:
        METHODS.pop(name, None)


def _no_tmp_leftovers(cache: Path) -> bool:
    return not any((cache / "repairs" / "tmp").iterdir())


def test_repair_that_raises_is_refused_cleanly(
    workspace: Workspace, tmp_path: Path, test_method: Callable[..., str]
) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.errors import AdapterRefused
    from vllm_safeguard.integration.worker_hook import attach_worker, load_adapter_hook

    def boom(*a: Any, **k: Any) -> MethodOutput:
        raise RuntimeError("method exploded")

    name = test_method("test_raises", boom)
    cache = tmp_path / "cache"
    mgr = SimpleNamespace()
    state = attach_worker(mgr, vllm_config(workspace, cache, method=name))
    assert state.pipeline is not None, state.error
    with pytest.raises(AdapterRefused, match="method exploded"):
        load_adapter_hook(mgr, LoRARequest("u", 1, str(workspace.adapters["unsafe"])), loader)
    assert state.pipeline.cache is not None and state.pipeline.cache.entries() == []
    assert _no_tmp_leftovers(cache)
    assert len(state.pipeline._name_locks) == 0  # the lock was released


def test_repair_that_hangs_times_out_and_is_refused(
    workspace: Workspace, tmp_path: Path, test_method: Callable[..., str]
) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from vllm_safeguard.errors import AdapterRefused
    from vllm_safeguard.integration.worker_hook import attach_worker, load_adapter_hook

    release = threading.Event()

    def hang(*a: Any, **k: Any) -> MethodOutput:
        release.wait(30)
        raise RuntimeError("released")

    name = test_method("test_hangs", hang)
    cache = tmp_path / "cache"
    mgr = SimpleNamespace()
    state = attach_worker(mgr, vllm_config(workspace, cache, method=name, repair_timeout_s=0.5))
    assert state.pipeline is not None, state.error
    before = limits.abandoned_repairs()
    t0 = time.monotonic()
    try:
        with pytest.raises(AdapterRefused, match=r"did not finish within repair_timeout_s=0\.5"):
            load_adapter_hook(mgr, LoRARequest("u", 1, str(workspace.adapters["unsafe"])), loader)
        assert time.monotonic() - t0 < 10
        assert limits.abandoned_repairs() == before + 1
        assert state.pipeline.cache is not None and state.pipeline.cache.entries() == []
        assert _no_tmp_leftovers(cache)
        # the same name can be loaded again right away (no lock left held)
        with pytest.raises(AdapterRefused, match="repair_timeout_s"):
            load_adapter_hook(mgr, LoRARequest("u", 1, str(workspace.adapters["unsafe"])), loader)
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while limits.abandoned_repairs() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert limits.abandoned_repairs() == before  # the abandoned threads ended once released


def test_too_many_abandoned_repairs_refuse_at_once() -> None:
    release = threading.Event()
    try:
        for _ in range(limits.MAX_ABANDONED):
            with pytest.raises(RepairTimeout):
                run_with_deadline(lambda: release.wait(30), 0.05)
        t0 = time.monotonic()
        with pytest.raises(RepairTimeout, match="too many timed-out repairs"):
            run_with_deadline(lambda: 1, 5)
        assert time.monotonic() - t0 < 1
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while limits.abandoned_repairs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_with_deadline(lambda: 7, 5) == 7
    with pytest.raises(ZeroDivisionError):
        run_with_deadline(lambda: 1 / 0, 5)
    assert run_with_deadline(lambda: 3, None) == 3


@pytest.mark.parametrize(
    "damage", ["truncate_weights", "flip_config_byte", "drop_manifest", "garble_manifest"]
)
def test_damaged_cache_entry_is_detected_and_rebuilt(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    counter = Counter(methods_mod.repair)
    monkeypatch.setattr(methods_mod, "repair", counter)
    p = make(workspace, tmp_path / "cache")
    first = p.process(workspace.adapters["unsafe"], "u")
    good_bytes = (first.path / "adapter_model.safetensors").read_bytes()
    if damage == "truncate_weights":
        w = first.path / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: len(good_bytes) // 2])
    elif damage == "flip_config_byte":
        c = first.path / "adapter_config.json"
        raw = bytearray(c.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        c.write_bytes(bytes(raw))
    elif damage == "drop_manifest":
        (first.path / "manifest.json").unlink()
    else:
        (first.path / "manifest.json").write_text("{not json")
    # a fresh process's view (no memoized verification) and the same process's view both rebuild
    for pipeline in (p, make(workspace, tmp_path / "cache")):
        again = pipeline.process(workspace.adapters["unsafe"], "u")
        assert (again.path / "adapter_model.safetensors").read_bytes() == good_bytes
    assert counter.calls == 2  # first build + exactly one rebuild


def test_exception_between_temp_write_and_rename_leaves_no_entry(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    p = make(workspace, cache)

    def failing_rename(src: Any, dst: Any) -> None:
        raise OSError("injected crash before rename")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected crash"):
        p.process(workspace.adapters["unsafe"], "u")
    monkeypatch.undo()
    assert p.cache is not None and p.cache.entries() == []
    assert _no_tmp_leftovers(cache)
    out = p.process(workspace.adapters["unsafe"], "u")
    assert not out.cache_hit and p.cache.entries() == [out.key]


_KILL_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.plugin.test_hardening import make
from vllm_safeguard.testing.workspace import prepare_tiny_workspace
ws = prepare_tiny_workspace({ws!r})
p = make(ws, Path({cache!r}))
def die(src, dst):  # every file of the entry is written and fsynced; the publishing rename is next
    os.kill(os.getpid(), signal.SIGKILL)
os.rename = die
p.process(ws.adapters["unsafe"], "u")
"""


def test_process_killed_mid_write_leaves_no_half_entry(workspace: Workspace, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    repo = str(Path(__file__).resolve().parents[2])
    code = _KILL_CHILD.format(repo=repo, ws=str(workspace.root), cache=str(cache))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    p = make(workspace, cache)
    assert p.cache is not None and p.cache.entries() == []  # nothing half-published
    leftovers = list((cache / "repairs" / "tmp").iterdir())
    assert leftovers  # the dead writer's staging folders, invisible to readers
    out = p.process(workspace.adapters["unsafe"], "u")
    assert not out.cache_hit and p.cache.entries() == [out.key]
    assert p.cache.sweep_tmp(max_age_s=0) >= len(leftovers)
    assert _no_tmp_leftovers(cache)


def test_symlink_escaping_one_root_is_refused_even_if_missing_in_another(tmp_path: Path) -> None:
    from vllm_safeguard.admission.paths import contained_path
    from vllm_safeguard.errors import AdapterValidationError

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.symlink("/etc", a / "link")
    with pytest.raises(AdapterValidationError, match="escapes the allowed adapter roots"):
        contained_path("link", [str(a), str(b)])
    with pytest.raises(AdapterValidationError, match="escapes the allowed adapter roots"):
        contained_path("link", [str(b), str(a)])
