"""Adapter load pipeline: validate -> score risk -> policy -> repair -> cache -> folder for vLLM.

:class:`SafeguardPipeline` is plain Python (tests and benchmarks use it directly). The two functions at
the bottom are what the vLLM patches call in the worker:

* :func:`attach_worker` (after ``WorkerLoRAManager.__init__``): resolve the config (vLLM's
  ``--additional-config`` is only known here), load the reference once per process, build the pipeline.
* :func:`load_adapter_hook` (instead of ``WorkerLoRAManager._load_adapter``): run the pipeline, then
  let vLLM's own loader read the *cached, repaired copy* (a copy of the ``LoRARequest`` whose
  ``lora_path`` points into the private cache). vLLM never reads the untrusted folder itself, so a
  folder changed after inspection cannot slip through.

Refusals raise :class:`AdapterRefused`, whose text is delimited so that the API-server patch can turn
vLLM's 500 into a 400 carrying it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterLimits,
    load_adapter,
    locate_adapter_files,
    module_shapes_from_model_dir,
    save_adapter,
)
from .cache import RepairCache, make_key
from .config import SafeguardConfig, load_config, log_effective
from .errors import AdapterValidationError, ConfigError, ReferenceArtifactError, RepairError, SafeguardError
from .limits import run_with_deadline
from .locks import NameLocks
from .paths import resolve_adapter_path, warn_if_unrestricted
from .vllm_patches import REFUSAL_END, REFUSAL_START

if TYPE_CHECKING:
    from .reference import AlignmentReference
    from .safegene import SafetyAdapter

logger = logging.getLogger("vllm_safeguard")

_CHUNK = 1 << 20


class AdapterRefused(SafeguardError):
    """An adapter was refused (fail-closed). ``str()`` is delimited for the API-server patch."""

    def __init__(self, adapter_name: str, reason: str) -> None:
        self.adapter_name = adapter_name
        self.reason = reason
        super().__init__(f"{REFUSAL_START}adapter {adapter_name!r} refused: {reason}{REFUSAL_END}")


@dataclass
class LoadOutcome:
    """What the pipeline decided for one load."""

    path: Path  # folder vLLM must read
    decision: str  # "repaired" | "passed"
    risk_score: float
    cache_hit: bool
    modules: int  # LoRA modules in the folder handed to vLLM
    duration_s: float
    report: dict[str, Any] | None = None
    key: str = ""
    cleanup: Callable[[], None] | None = None  # set when the folder is not a cache entry


# ------------------------------------------------------------------------------------------ artifacts


def slug(name: str) -> str:
    """A model id as one path component (``org/model`` -> ``org--model``)."""
    return name.strip("/").replace("/", "--") or "model"


def artifact_candidates(
    config: SafeguardConfig, kind: str, model_name: str, model_dir: Path | None
) -> list[Path]:
    """Where to look for ``kind`` ("reference" or "safety_adapter"), first match wins."""
    explicit = {
        "reference": config.reference_path,
        "safety_adapter": config.safety_adapter_path,
        "translator": config.translator_path,
    }[kind]
    if explicit is not None:
        return [explicit]
    out: list[Path] = []
    if config.artifacts_dir is not None:
        out.append(config.artifacts_dir / slug(model_name) / kind)
        if model_dir is not None:
            out.append(config.artifacts_dir / slug(model_dir.name) / kind)
    if model_dir is not None:
        out.append(model_dir / "safeguard" / kind)
    return out


@functools.lru_cache(maxsize=8)
def _load_reference(path: str) -> AlignmentReference:
    from .reference import AlignmentReference

    return AlignmentReference.load(path)


@functools.lru_cache(maxsize=8)
def _load_safety(path: str) -> SafetyAdapter:
    from .safegene import SafetyAdapter

    return SafetyAdapter.load(path)


def locate_reference(config: SafeguardConfig, model_name: str, model_dir: Path | None) -> AlignmentReference:
    """Load (once per process) the alignment reference for the served model."""
    tried = artifact_candidates(config, "reference", model_name, model_dir)
    for cand in tried:
        if cand.is_dir():
            return _load_reference(str(cand.resolve()))
    raise ReferenceArtifactError(
        f"no alignment reference for model {model_name!r}: tried {[str(p) for p in tried] or 'nothing'}; "
        "set SAFEGUARD_REFERENCE_PATH (or 'reference_path' in the config) to a folder made by "
        "AlignmentReference.save"
    )


def locate_safety(config: SafeguardConfig, model_name: str, model_dir: Path | None) -> SafetyAdapter:
    tried = artifact_candidates(config, "safety_adapter", model_name, model_dir)
    for cand in tried:
        if cand.is_dir():
            return _load_safety(str(cand.resolve()))
    raise ReferenceArtifactError(
        f"method 'safegene' needs a safety adapter for model {model_name!r}: tried {[str(p) for p in tried]}; "
        "set SAFEGUARD_SAFETY_ADAPTER_PATH"
    )


@functools.lru_cache(maxsize=4)
def _load_translator(path: str) -> Any:
    from .translator import Translator

    return Translator.load(path)


def locate_translator(config: SafeguardConfig, model_name: str, model_dir: Path | None) -> Any:
    """``(Translator, TranslatorManifest)`` for method 'translator' (loaded once per process)."""
    tried = artifact_candidates(config, "translator", model_name, model_dir)
    for cand in tried:
        if cand.is_dir():
            return _load_translator(str(cand.resolve()))
    raise ReferenceArtifactError(
        f"method 'translator' needs a translator artifact for model {model_name!r}: tried "
        f"{[str(p) for p in tried]}; set SAFEGUARD_TRANSLATOR_PATH"
    )


# ------------------------------------------------------------------------------------------ hashing


def _file_sig(path: Path) -> tuple[int, int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _copy_and_hash(files: list[tuple[str, Path]], dest: Path) -> str:
    """sha256 over (name, sha256(bytes)) of each file, copying the bytes to ``dest`` while reading them,
    so that what is hashed is exactly what gets validated (no time-of-check/time-of-use gap)."""
    outer = hashlib.sha256()
    for name, src in files:
        inner = hashlib.sha256()
        with open(src, "rb") as fin, open(dest / name, "wb") as fout:
            while block := fin.read(_CHUNK):
                inner.update(block)
                fout.write(block)
        outer.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class PipelineContext:
    """What the pipeline needs to know about the served model."""

    model_name: str
    model_dir: Path | None
    max_lora_rank: int | None = None


@dataclass
class SafeguardPipeline:
    """Validate, score, repair and cache adapters for one served base model (one per process)."""

    config: SafeguardConfig
    ctx: PipelineContext
    reference: AlignmentReference | None = None
    safety: SafetyAdapter | None = None
    cache: RepairCache | None = None
    _base_shapes: dict[str, tuple[int, int]] | None = None
    _digests: dict[tuple[Any, ...], str] = field(default_factory=dict)
    # Per-adapter-name locks (vllm_safeguard.locks): same name serialized, re-checked inside.
    _name_locks: NameLocks = field(default_factory=NameLocks)
    translator: Any = None  # vllm_safeguard.translator.Translator for method 'translator'
    translator_hash: str = ""

    @classmethod
    def create(cls, config: SafeguardConfig, ctx: PipelineContext) -> SafeguardPipeline:
        """Load every artifact now, so a misconfiguration shows at startup, not at the first load."""
        from .methods import METHODS

        if config.method not in METHODS:
            raise ConfigError(
                f"method {config.method!r} is not available in this build (have {sorted(METHODS)})"
            )
        reference = locate_reference(config, ctx.model_name, ctx.model_dir)
        if ctx.model_dir is not None:
            reference.check_model(ctx.model_dir)
        safety = locate_safety(config, ctx.model_name, ctx.model_dir) if config.method == "safegene" else None
        shapes = module_shapes_from_model_dir(ctx.model_dir) if ctx.model_dir is not None else None
        cache = RepairCache(config.cache_dir / "repairs")
        pipeline = cls(config, ctx, reference, safety, cache, shapes)
        if config.method == "translator":
            pipeline.translator, manifest = locate_translator(config, ctx.model_name, ctx.model_dir)
            pipeline.translator_hash = manifest.content_hash
            if manifest.reference_hash and manifest.reference_hash != reference.manifest.content_hash:
                raise ReferenceArtifactError(
                    "translator was trained with another alignment reference "
                    f"({manifest.reference_hash[:12]} != {reference.manifest.content_hash[:12]})"
                )
        return pipeline

    # ----------------------------------------------------------------- keys
    @property
    def max_rank(self) -> int | None:
        bounds = [r for r in (self.config.max_rank, self.ctx.max_lora_rank) if r is not None]
        return min(bounds) if bounds else None

    def _key(self, digest: str) -> str:
        assert self.reference is not None
        method_cfg = self.config.method_config() | {"max_rank": self.max_rank}
        salt = __version__
        if self.safety is not None:
            salt += ":" + self.safety.manifest.content_hash
        if self.translator_hash:
            salt += ":" + self.translator_hash
        return make_key(digest, self.reference.manifest.content_hash, method_cfg, salt=salt)

    def _limits(self) -> AdapterLimits:
        return AdapterLimits(max_total_bytes=self.config.max_adapter_bytes)

    def _source_files(self, folder: Path) -> list[tuple[str, Path]]:
        cfg, weights = locate_adapter_files(folder, self._limits())
        return [(CONFIG_NAME, cfg), (WEIGHTS_NAME, weights)]

    # ----------------------------------------------------------------- main
    def process(self, adapter_path: str | os.PathLike[str], adapter_name: str = "adapter") -> LoadOutcome:
        """Return the folder vLLM should load instead of ``adapter_path``.

        Raises:
            SafeguardError: validation, artifacts or repair failed (the caller refuses the adapter).
        """
        if self.reference is None or self.cache is None:
            raise ReferenceArtifactError("pipeline has no reference loaded")
        t0 = time.perf_counter()
        folder = Path(adapter_path)
        files = self._source_files(folder)
        sig = tuple(_file_sig(p) for _, p in files)
        with self._name_locks.hold(adapter_name):
            digest = self._digests.get(sig)
            if digest is not None and self.config.cache_enabled:
                entry = self.cache.get(self._key(digest))
                if entry is not None:  # warm hit: a few stat() calls, no hashing
                    return self._outcome_from_entry(entry, hit=True, t0=t0)
            stage = self.cache.staging_dir()
            try:
                digest = _copy_and_hash(files, stage)
                self._digests[sig] = digest
                key = self._key(digest)
                if not self.config.cache_enabled:
                    return self._build(stage, key, adapter_name, t0, publish=False)
                with self.cache.lock(key):  # other processes wait instead of repeating the repair
                    entry = self.cache.get(key)
                    if entry is not None:
                        return self._outcome_from_entry(entry, hit=True, t0=t0)
                    return self._build(stage, key, adapter_name, t0, publish=True)
            finally:
                shutil.rmtree(stage, ignore_errors=True)

    def _outcome_from_entry(self, entry: Any, *, hit: bool, t0: float) -> LoadOutcome:
        info = entry.info
        return LoadOutcome(
            path=entry.path,
            decision=str(info["decision"]),
            risk_score=float(info["risk_score"]),
            cache_hit=hit,
            modules=int(info["modules"]),
            duration_s=time.perf_counter() - t0,
            report=info.get("report"),
            key=entry.key,
        )

    def _repair_with_deadline(self, repair: Callable[..., Any], adapter: Any) -> Any:
        """Run the method within ``config.repair_timeout_s`` (see vllm_safeguard.limits).

        Only the pure computation runs on the deadline thread; publishing stays on the caller's.
        """
        assert self.reference is not None
        reference, config, max_rank, safety = self.reference, self.config, self.max_rank, self.safety
        return run_with_deadline(
            lambda: repair(
                adapter,
                reference,
                config.method,
                config.method_options,
                max_rank=max_rank,
                safety=safety,
                translator=self.translator,
            ),
            config.repair_timeout_s,
            what=f"repair ({config.method})",
        )

    def _build(self, stage: Path, key: str, adapter_name: str, t0: float, *, publish: bool) -> LoadOutcome:
        """Validate the staged copy, score it, repair it by policy; publish (or keep private) the result."""
        from .methods import repair
        from .risk import score_adapter

        assert self.reference is not None and self.cache is not None
        adapter = load_adapter(stage, limits=self._limits(), base_shapes=self._base_shapes)
        risk = score_adapter(adapter, self.reference)
        if not risk.modules:
            # Nothing to measure against: passing it through would be a silent no-op.
            raise RepairError(
                f"none of the adapter's {len(adapter.modules)} modules is covered by the alignment reference "
                f"(e.g. {next(iter(adapter.modules), '<none>')!r})"
            )
        build_root = self.cache.staging_dir("build-")
        keep = False
        try:
            out = build_root / "adapter"
            report: dict[str, Any] | None = None
            if risk.score < self.config.risk_threshold:
                decision = "passed"
                out.mkdir()
                for name in (CONFIG_NAME, WEIGHTS_NAME):  # the validated bytes, unchanged
                    shutil.copyfile(stage / name, out / name)
                modules = len(adapter.modules)
            else:
                result = self._repair_with_deadline(repair, adapter)
                rep = result.report
                if rep.modules_matched < 1:
                    raise RepairError("repair matched no module of the adapter")
                report = rep.model_dump(mode="json")
                # A method may judge every module harmless (e.g. SafeLoRA's similarity threshold).
                decision = "repaired" if rep.modules_touched > 0 else "passed"
                save_adapter(result.adapter, out)
                modules = len(result.adapter.modules)
            info = {
                "decision": decision,
                "risk_score": risk.score,
                "risk_threshold": self.config.risk_threshold,
                "modules": modules,
                "method": self.config.method,
                "report": report,
                "first_name": adapter_name,
                "reference_hash": self.reference.manifest.content_hash,
            }
            if publish:
                entry = self.cache.put(key, out, info)
                return self._outcome_from_entry(entry, hit=False, t0=t0)
            keep = True
            return LoadOutcome(
                path=out,
                decision=decision,
                risk_score=risk.score,
                cache_hit=False,
                modules=modules,
                duration_s=time.perf_counter() - t0,
                report=report,
                key=key,
                cleanup=functools.partial(shutil.rmtree, build_root, ignore_errors=True),
            )
        finally:
            if not keep:
                shutil.rmtree(build_root, ignore_errors=True)


def summarize(name: str, outcome: LoadOutcome, config: SafeguardConfig) -> str:
    """One log line per load."""
    rep = outcome.report or {}
    what = (
        f"{config.method} touched {rep.get('modules_touched', 0)}/{rep.get('modules_total', outcome.modules)} "
        f"modules in {rep.get('layers_repaired', 0)} layers"
        if outcome.report is not None
        else f"below threshold {config.risk_threshold}, served unchanged"
    )
    src = "cache hit" if outcome.cache_hit else "computed"
    return (
        f"vllm-safeguard: adapter {name!r}: risk {outcome.risk_score:.3f} -> {outcome.decision} ({what}); "
        f"{src} in {outcome.duration_s * 1000:.1f} ms"
    )


# ====================================================================================== vLLM side

STATE_ATTR = "_safeguard_state"


@dataclass
class WorkerState:
    """Attached to each ``WorkerLoRAManager`` by the ``__init__`` patch."""

    model_name: str
    config: SafeguardConfig | None = None
    pipeline: SafeguardPipeline | None = None
    error: str | None = None  # why every load is refused (config or artifacts broken)

    @property
    def enabled(self) -> bool:
        return self.config is None or self.config.enabled  # no config (it failed) -> fail closed


def _model_dir(model: str) -> Path | None:
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    try:  # a hub id: the snapshot vLLM already downloaded
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


def attach_worker(manager: Any, vllm_config: Any) -> WorkerState:
    """Build the worker's pipeline. Never raises: a broken setup refuses adapters instead."""
    from .metrics import get_metrics

    model_cfg = vllm_config.model_config
    served = model_cfg.served_model_name
    model_name = str(served[0] if isinstance(served, list) else served or model_cfg.model)
    state = WorkerState(model_name=model_name)
    setattr(manager, STATE_ATTR, state)
    method = "unknown"
    try:
        config = load_config(getattr(vllm_config, "additional_config", None) or {})
        state.config = config
        method = config.method
        log_effective(config, context=f"model {model_name}")
        warn_if_unrestricted(config.adapter_roots)
        if config.enabled and config.alpha_enabled:
            # The punica-wrapper patch (create_lora_manager runs right after this) reads this flag.
            from .punica_safety import request_safety_wrapper

            request_safety_wrapper()
        if config.enabled:
            lora_cfg = vllm_config.lora_config
            ctx = PipelineContext(
                model_name=model_name,
                model_dir=_model_dir(str(model_cfg.model)),
                max_lora_rank=getattr(lora_cfg, "max_lora_rank", None),
            )
            state.pipeline = SafeguardPipeline.create(config, ctx)
            logger.info("vllm-safeguard: active for model %s (method %s)", model_name, config.method)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        logger.error(
            "vllm-safeguard: cannot protect model %s; every adapter will be refused: %s", model_name, e
        )
    with _suppress_metric_errors():
        get_metrics().worker_active.labels(model_name=model_name, method=method).set(
            1 if state.pipeline is not None else 0
        )
    return state


class _suppress_metric_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is not None:
            logger.warning("vllm-safeguard: metrics error ignored: %s", exc)
        return True


def _short_path(path: object, limit: int = 200) -> str:
    text = repr(path)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def adapter_folder(config: SafeguardConfig, lora_path: str) -> str:
    """The folder to inspect for a request's ``lora_path`` (vllm_safeguard.paths).

    With ``adapter_roots`` configured: contained in a root, or :class:`AdapterValidationError`. Without:
    resolved the way vLLM resolves it (absolute, ``~``, working directory, hub id).
    """
    contained = resolve_adapter_path(lora_path, config.adapter_roots)
    if contained is not None:
        return contained
    from vllm.lora.utils import get_adapter_absolute_path

    return str(get_adapter_absolute_path(lora_path))


def load_adapter_hook(manager: Any, lora_request: Any, original: Callable[[Any, Any], Any]) -> Any:
    """The body of the patched ``WorkerLoRAManager._load_adapter``."""
    import msgspec

    from .metrics import get_metrics

    state: WorkerState | None = getattr(manager, STATE_ATTR, None)
    name = str(lora_request.lora_name)
    if state is not None and state.config is not None and not state.config.enabled:
        return original(manager, lora_request)
    model_name = state.model_name if state is not None else "unknown"
    method = state.config.method if state is not None and state.config is not None else "unknown"
    m = get_metrics()

    def refuse(reason: str) -> AdapterRefused:
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome="refused", method=method).inc()
        logger.error("vllm-safeguard: adapter %r refused: %s", name, reason)
        return AdapterRefused(name, reason)

    if state is None or state.pipeline is None:
        raise refuse(
            state.error if state is not None and state.error else "safeguard pipeline is not initialised"
        )
    pipeline = state.pipeline
    from vllm.exceptions import LoRAAdapterNotFoundError

    try:
        path = adapter_folder(pipeline.config, lora_request.lora_path)
    except AdapterValidationError as e:  # outside the adapter roots: always refused, even fail-open
        raise refuse(str(e)) from e
    except Exception as e:
        raise refuse(f"cannot resolve adapter path {_short_path(lora_request.lora_path)}: {e}") from e
    if not os.path.isdir(path):
        # Same answer (404) vLLM gives; raised here so vLLM never opens the path itself.
        raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
    try:
        outcome = pipeline.process(path, name)
    except Exception as e:
        if pipeline.config.fail_closed:
            raise refuse(str(e)) from e
        logger.error(
            "vllm-safeguard: adapter %r NOT repaired (fail_closed=false), serving it as is: %s", name, e
        )
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome="unrepaired", method=method).inc()
        # The contained folder, not the request's string (which vLLM would resolve on its own terms).
        return original(manager, msgspec.structs.replace(lora_request, lora_path=path))
    try:
        lora = original(manager, msgspec.structs.replace(lora_request, lora_path=str(outcome.path)))
    except LoRAAdapterNotFoundError as e:
        raise refuse(f"the repaired adapter folder vanished: {e}") from e
    except Exception as e:
        raise refuse(f"vLLM could not load the repaired adapter: {e}") from e
    finally:
        if outcome.cleanup is not None:
            outcome.cleanup()
    loaded = len(getattr(lora, "loras", {}))
    if loaded != outcome.modules:
        # vLLM skips modules it does not expect; an adapter repaired on paper but not in the engine
        # must not be served.
        raise refuse(f"vLLM loaded {loaded} of the {outcome.modules} repaired modules")
    with _suppress_metric_errors():
        if pipeline.config.cache_enabled:
            m.cache_lookups.labels(model_name=model_name).inc()
        if outcome.cache_hit:
            m.cache_hits.labels(model_name=model_name).inc()
        m.loads.labels(model_name=model_name, outcome=outcome.decision, method=method).inc()
        m.risk_score.labels(model_name=model_name).observe(outcome.risk_score)
        m.repair_duration.labels(
            model_name=model_name, method=method, cache="hit" if outcome.cache_hit else "miss"
        ).observe(outcome.duration_s)
        if not outcome.cache_hit and outcome.report is not None:
            m.layers_repaired.labels(model_name=model_name, method=method).inc(
                int(outcome.report.get("layers_repaired", 0))
            )
            expert = (outcome.report.get("summary") or {}).get("dominant_expert")
            if expert in ("surgical", "aggressive"):  # bounded label values
                m.translator_routing.labels(model_name=model_name, expert=expert).inc()
    if pipeline.config.log_reports:
        logger.info("%s", summarize(name, outcome, pipeline.config))
    return lora
