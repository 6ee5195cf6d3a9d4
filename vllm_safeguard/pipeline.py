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

import fnmatch
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

import torch

from . import __version__
from .adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterLimits,
    load_adapter,
    locate_adapter_files,
    module_norms_from_model_dir,
    module_shapes_from_model_dir,
)
from .admission import Admission, AdmissionRules, admit
from .bindings import publish_binding
from .cache import RepairCache, make_key
from .canonical import write_canonical
from .config import SafeguardConfig, load_config, log_effective
from .errors import (
    AdapterValidationError,
    ConfigError,
    CoverageError,
    ReferenceArtifactError,
    SafeguardError,
    UnrepairableError,
    relocated,
)
from .limits import run_with_deadline
from .locks import NameLocks
from .paths import resolve_adapter_path, warn_if_unrestricted
from .vllm_patches import REFUSAL_END, REFUSAL_START

if TYPE_CHECKING:
    from .reference import AlignmentReference
    from .safegene import SafetyAdapter

logger = logging.getLogger("vllm_safeguard")

_CHUNK = 1 << 20


# Refusal kinds (the metrics' outcome label is "refused_<kind>").
REFUSAL_KINDS = ("invalid", "uncovered", "unrepairable", "error")


def refusal_kind(error: BaseException) -> str:
    """``invalid`` (bad or unbounded input, or what vLLM would refuse), ``uncovered`` (a module nothing
    can score), ``unrepairable`` (risky and not repaired below the threshold), else ``error``."""
    if isinstance(error, AdapterValidationError):
        return "invalid"
    if isinstance(error, CoverageError):
        return "uncovered"
    if isinstance(error, UnrepairableError):
        return "unrepairable"
    return "error"


class AdapterRefused(SafeguardError):
    """An adapter was refused (fail-closed). ``str()`` is delimited for the API-server patch."""

    def __init__(self, adapter_name: str, reason: str, kind: str = "error") -> None:
        self.adapter_name = adapter_name
        self.reason = reason
        self.kind = kind
        super().__init__(f"{REFUSAL_START}adapter {adapter_name!r} refused ({kind}): {reason}{REFUSAL_END}")


@dataclass
class LoadOutcome:
    """What the pipeline decided for one load."""

    path: Path  # folder vLLM must read (always a canonical folder the plugin wrote)
    decision: str  # "repaired" | "passed"
    risk_score: float  # before the repair (worst module, vllm_safeguard.risk)
    cache_hit: bool
    modules: int  # LoRA modules in the folder handed to vLLM
    duration_s: float
    report: dict[str, Any] | None = None
    key: str = ""
    cleanup: Callable[[], None] | None = None  # set when the folder is not a cache entry
    risk_after: float | None = None  # after the repair (None: it did not run)
    stripped: list[str] = field(default_factory=list)  # uncovered modules removed (coverage='strip')
    admission: Admission | None = None  # the in-memory decision (only when computed, not on a cache hit)


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
    # Module kinds vLLM applies LoRA to for this model (from its adapter manager; None: not known here).
    expected_modules: set[str] | None = None
    # dtype the server computes LoRA in (vLLM's lora_dtype / model dtype; None: not known here).
    served_dtype: Any = None


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
    _base_norms: dict[str, float] | None = None  # ||W||_F per module, for max_update_ratio

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
        if ctx.model_dir is not None and config.max_update_ratio is not None:
            covered, allow = set(reference.modules), config.coverage_allow
            pipeline._base_norms = module_norms_from_model_dir(
                ctx.model_dir, lambda m: m in covered or any(fnmatch.fnmatchcase(m, p) for p in allow)
            )
        elif config.max_update_ratio is not None:
            logger.warning(
                "vllm-safeguard: model folder of %r not found; max_update_ratio cannot be enforced "
                "(only finiteness is)",
                ctx.model_name,
            )
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
        ctx = {
            "expected_modules": sorted(self.ctx.expected_modules or ()),
            "served_dtype": str(self.ctx.served_dtype),
            "canonical": 1,
        }
        return make_key(digest, self.reference.manifest.content_hash, method_cfg | ctx, salt=salt)

    def rules(self) -> AdmissionRules:
        c = self.config
        return AdmissionRules(
            c.risk_threshold, c.coverage, tuple(c.coverage_allow), c.max_update_ratio, c.max_served_risk
        )

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
            except AdapterValidationError as e:  # name the caller's file, not our staging copy
                raise relocated(e, str(stage), str(folder)) from e
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
            risk_after=info.get("risk_after"),
            stripped=list(info.get("stripped") or []),
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
        """Validate the staged copy, admit it (vllm_safeguard.admission), write the canonical folder and
        publish it (or keep it private). Never copies the caller's config or tensors."""
        from .methods import repair

        assert self.reference is not None and self.cache is not None
        adapter = load_adapter(stage, limits=self._limits(), base_shapes=self._base_shapes)
        adm = admit(
            adapter,
            self.reference,
            self.rules(),
            lambda canonical: self._repair_with_deadline(repair, canonical),
            base_norms=self._base_norms,
            expected_modules=self.ctx.expected_modules,
            served_dtype=self.ctx.served_dtype,
        )
        report = adm.report.model_dump(mode="json") if adm.report is not None else None
        build_root = self.cache.staging_dir("build-")
        keep = False
        try:
            out = write_canonical(adm.served, build_root / "adapter")
            info = {
                "decision": adm.decision,
                "risk_score": adm.risk.score,
                "risk_after": adm.risk_after,
                "risk_pooled": adm.risk.pooled,
                "worst_module": adm.risk.worst_module,
                "risk_threshold": self.config.risk_threshold,
                "modules": len(adm.served.modules),
                "stripped": adm.stripped,
                "allowed_uncovered": adm.allowed_uncovered,
                "method": self.config.method,
                "report": report,
                "first_name": adapter_name,
                "reference_hash": self.reference.manifest.content_hash,
            }
            if publish:
                entry = self.cache.put(key, out, info)
                outcome = self._outcome_from_entry(entry, hit=False, t0=t0)
                outcome.admission = adm
                return outcome
            keep = True
            return LoadOutcome(
                path=out,
                decision=adm.decision,
                risk_score=adm.risk.score,
                cache_hit=False,
                modules=len(adm.served.modules),
                duration_s=time.perf_counter() - t0,
                report=report,
                key=key,
                cleanup=functools.partial(shutil.rmtree, build_root, ignore_errors=True),
                risk_after=adm.risk_after,
                stripped=adm.stripped,
                admission=adm,
            )
        finally:
            if not keep:
                shutil.rmtree(build_root, ignore_errors=True)


def summarize(name: str, outcome: LoadOutcome, config: SafeguardConfig) -> str:
    """One log line per load."""
    rep = outcome.report or {}
    what = (
        f"{config.method} touched {rep.get('modules_touched', 0)}/{rep.get('modules_total', outcome.modules)} "
        f"modules in {rep.get('layers_repaired', 0)} layers, risk after {outcome.risk_after:.3f}"
        if outcome.report is not None and outcome.risk_after is not None
        else f"below threshold {config.risk_threshold}, served canonicalized"
    )
    if outcome.stripped:
        what += f"; stripped {len(outcome.stripped)} uncovered modules ({outcome.stripped[:3]})"
    src = "cache hit" if outcome.cache_hit else "computed"
    return (
        f"vllm-safeguard: adapter {name!r}: risk {outcome.risk_score:.3f} -> {outcome.decision} ({what}); "
        f"{src} in {outcome.duration_s * 1000:.1f} ms"
    )


# ====================================================================================== vLLM side

STATE_ATTR = "_safeguard_state"


@dataclass(frozen=True)
class Binding:
    """One admitted adapter: its cache key (verified on every reload) or a private folder (no cache)."""

    key: str
    path: Path
    private: bool = False


@dataclass
class WorkerState:
    """Attached to each ``WorkerLoRAManager`` by the ``__init__`` patch."""

    model_name: str
    config: SafeguardConfig | None = None
    pipeline: SafeguardPipeline | None = None
    error: str | None = None  # why every load is refused (config or artifacts broken)
    # (lora_name, lora_int_id) -> the canonical folder its first admission produced. vLLM gives every
    # /v1/load_lora_adapter call a new int id, so an unload + load admits afresh, while an eviction
    # reload (same request object) is served from this binding and never re-reads the source folder.
    bindings: dict[tuple[str, int], Binding] = field(default_factory=dict)

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
            lora_dtype = getattr(lora_cfg, "lora_dtype", None)
            ctx = PipelineContext(
                model_name=model_name,
                model_dir=_model_dir(str(model_cfg.model)),
                max_lora_rank=getattr(lora_cfg, "max_lora_rank", None),
                served_dtype=lora_dtype
                if isinstance(lora_dtype, torch.dtype)
                else getattr(model_cfg, "dtype", None),
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


def _expected_modules(manager: Any) -> set[str] | None:
    """The module kinds vLLM's loader accepts for this model (what ``_load_adapter`` computes)."""
    am = getattr(manager, "_adapter_manager", None)
    if am is None:
        return None
    packed = getattr(am, "packed_modules_mapping", {}) or {}
    out: set[str] = set()
    for module in getattr(am, "supported_lora_modules", ()):
        out.update(packed.get(module, [module]))
        if module == "experts":
            out.add(module)
    return out or None


def _resolve_bound(pipeline: SafeguardPipeline, binding: Binding) -> Path | None:
    """The bound canonical folder if it is still intact (cache entries are re-verified), else None."""
    if binding.private:
        return binding.path if (binding.path / WEIGHTS_NAME).is_file() else None
    assert pipeline.cache is not None
    entry = pipeline.cache.get(binding.key)
    return None if entry is None else entry.path


def _empty_lora(lora_request: Any) -> Any:
    """An adapter with no module: what a request gets when its admitted copy cannot be had inside an
    engine step (the engine must not die for one adapter); the base (aligned) model serves it."""
    from vllm.lora.lora_model import LoRAModel

    return LoRAModel(lora_request.lora_int_id, 1, {})


def load_adapter_hook(
    manager: Any, lora_request: Any, original: Callable[[Any, Any], Any], *, in_step: bool = False
) -> Any:
    """The body of the patched ``WorkerLoRAManager._load_adapter``.

    ``in_step``: vLLM called it inside ``execute_model`` (an adapter of a scheduled request was not in
    its CPU cache). A refusal raised there kills the EngineCore, so in a step nothing raises: a bound
    adapter is served from its admitted canonical copy; when that copy is gone, or the adapter was
    never admitted and is refused now, the requests get the base model (an empty adapter), the error is
    logged and counted (``safeguard_step_failures_total``).
    """
    try:
        return _load_adapter_checked(manager, lora_request, original)
    except Exception as e:
        if not in_step:
            raise
        from .metrics import get_metrics

        state: WorkerState | None = getattr(manager, STATE_ATTR, None)
        model_name = state.model_name if state is not None else "unknown"
        logger.error(
            "vllm-safeguard: adapter %r could not be loaded inside an engine step; its requests are served "
            "by the base model without it (the engine keeps running): %s",
            str(lora_request.lora_name),
            e,
        )
        with _suppress_metric_errors():
            get_metrics().step_failures.labels(model_name=model_name).inc()
        return _empty_lora(lora_request)


def _load_adapter_checked(manager: Any, lora_request: Any, original: Callable[[Any, Any], Any]) -> Any:
    import msgspec

    from .metrics import get_metrics

    state: WorkerState | None = getattr(manager, STATE_ATTR, None)
    name = str(lora_request.lora_name)
    if state is not None and state.config is not None and not state.config.enabled:
        return original(manager, lora_request)
    model_name = state.model_name if state is not None else "unknown"
    method = state.config.method if state is not None and state.config is not None else "unknown"
    m = get_metrics()

    def refuse(reason: str, kind: str = "error") -> AdapterRefused:
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome=f"refused_{kind}", method=method).inc()
        logger.error("vllm-safeguard: adapter %r refused (%s): %s", name, kind, reason)
        return AdapterRefused(name, reason, kind)

    if state is None or state.pipeline is None:
        raise refuse(
            state.error if state is not None and state.error else "safeguard pipeline is not initialised"
        )
    pipeline = state.pipeline
    if pipeline.ctx.expected_modules is None:
        pipeline.ctx.expected_modules = _expected_modules(manager)
    bind_key = (name, int(getattr(lora_request, "lora_int_id", 0) or 0))
    binding = state.bindings.get(bind_key)
    if binding is not None:
        # An eviction reload: the admitted bytes, never the source folder again.
        bound = _resolve_bound(pipeline, binding)
        if bound is None:
            raise refuse(
                "its admitted canonical copy is gone or corrupt (cache entry "
                f"{binding.key[:12]}); unload and load the adapter again"
            )
        with _suppress_metric_errors():
            m.reloads.labels(model_name=model_name).inc()
        return original(manager, msgspec.structs.replace(lora_request, lora_path=str(bound)))
    from vllm.exceptions import LoRAAdapterNotFoundError

    try:
        path = adapter_folder(pipeline.config, lora_request.lora_path)
    except AdapterValidationError as e:  # outside the adapter roots: always refused, even fail-open
        raise refuse(str(e), "invalid") from e
    except Exception as e:
        raise refuse(
            f"cannot resolve adapter path {_short_path(lora_request.lora_path)}: {e}", "invalid"
        ) from e
    if not os.path.isdir(path):
        # Same answer (404) vLLM gives; raised here so vLLM never opens the path itself.
        raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
    try:
        outcome = pipeline.process(path, name)
    except Exception as e:
        kind = refusal_kind(e)
        # fail_closed=false serves an adapter whose *processing* failed; a decision (invalid,
        # uncovered, unrepairable) is never overridden by it.
        if pipeline.config.fail_closed or kind != "error":
            raise refuse(str(e), kind) from e
        logger.error(
            "vllm-safeguard: adapter %r NOT repaired (fail_closed=false), serving it as is: %s", name, e
        )
        with _suppress_metric_errors():
            m.loads.labels(model_name=model_name, outcome="unrepaired", method=method).inc()
        # The contained folder, not the request's string (which vLLM would resolve on its own terms).
        return original(manager, msgspec.structs.replace(lora_request, lora_path=path))
    try:
        try:
            lora = original(manager, msgspec.structs.replace(lora_request, lora_path=str(outcome.path)))
        except LoRAAdapterNotFoundError as e:
            raise refuse(f"the repaired adapter folder vanished: {e}") from e
        except Exception as e:
            raise refuse(f"vLLM could not load the admitted adapter: {e}") from e
        loaded = len(getattr(lora, "loras", {}))
        if loaded != outcome.modules:
            # vLLM skips modules it does not expect; an adapter repaired on paper but not in the engine
            # must not be served.
            raise refuse(f"vLLM loaded {loaded} of the {outcome.modules} repaired modules")
    except AdapterRefused:
        if outcome.cleanup is not None:
            outcome.cleanup()
        raise
    # Private folders (cache disabled) are kept for eviction reloads of this binding.
    state.bindings[bind_key] = Binding(outcome.key, outcome.path, private=outcome.cleanup is not None)
    try:  # for the API server's per-request check (vllm_safeguard.bindings); best effort
        publish_binding(pipeline.config.cache_dir, model_name, name, bind_key[1], outcome.path)
    except OSError as e:
        logger.warning("vllm-safeguard: cannot publish the binding of adapter %r: %s", name, e)
    with _suppress_metric_errors():
        if pipeline.config.cache_enabled:
            m.cache_lookups.labels(model_name=model_name).inc()
        if outcome.cache_hit:
            m.cache_hits.labels(model_name=model_name).inc()
        m.loads.labels(model_name=model_name, outcome=outcome.decision, method=method).inc()
        m.risk_score.labels(model_name=model_name).observe(outcome.risk_score)
        if outcome.stripped:
            m.modules_stripped.labels(model_name=model_name).inc(len(outcome.stripped))
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
