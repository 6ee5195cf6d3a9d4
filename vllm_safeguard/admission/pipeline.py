"""Adapter load pipeline: stage (copy + hash) -> validate -> admit -> canonical folder -> cache.

:class:`SafeguardPipeline` is plain Python with no vLLM import (tests, benchmarks and
``vllm-safeguard admit`` use it directly); the decision rules live in
:mod:`vllm_safeguard.admission.rules`, the form vLLM reads in :mod:`vllm_safeguard.admission.canonical`,
and the worker side that the vLLM patches call in :mod:`vllm_safeguard.integration.worker_hook`. The
bytes are hashed while they are copied into a private staging folder, so what is validated is exactly
what the content address names.

Semantics of :meth:`SafeguardPipeline.process` (one adapter folder)::

    files  = locate_adapter_files(folder)                  # bounded, no symlinks out (core.adapter_io)
    digest = sha256 while copying files -> staging          # what is hashed is what is validated
    key    = H(digest, reference, method config + options, artifacts' hashes, served context)
    cache hit for key                   -> the entry's canonical folder (nothing recomputed)
    else (under a cross-process lock on key):
        adapter   = load_adapter(staging)                   # validate
        admission = admit(adapter, reference, rules, repair) # score once -> repair -> verify (rules)
        publish write_canonical(admission.served) as the cache entry for key
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

from ..config import SafeguardConfig
from ..core.adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterLimits,
    load_adapter,
    locate_adapter_files,
)
from ..core.artifacts import Loaded, locate
from ..core.model_files import module_norms_from_model_dir, module_shapes_from_model_dir
from ..core.reference import REFERENCE
from ..errors import AdapterValidationError, ConfigError, ReferenceArtifactError, relocated
from ..version import __version__
from .cache import RepairCache, make_key
from .canonical import write_canonical
from .limits import run_with_deadline
from .locks import NameLocks
from .rules import ADMISSION_VERSION, Admission, AdmissionRules, admit

if TYPE_CHECKING:
    from ..core.reference import AlignmentReference

logger = logging.getLogger("vllm_safeguard")

_CHUNK = 1 << 20


@dataclass
class LoadOutcome:
    """What the pipeline decided for one load."""

    path: Path  # folder vLLM must read (always a canonical folder the plugin wrote)
    decision: str  # "repaired" | "passed"
    risk_score: float  # before the repair (worst module, vllm_safeguard.core.risk)
    cache_hit: bool
    modules: int  # LoRA modules in the folder handed to vLLM
    duration_s: float
    report: dict[str, Any] | None = None
    key: str = ""
    cleanup: Callable[[], None] | None = None  # set when the folder is not a cache entry
    risk_after: float | None = None  # after the repair (None: it did not run)
    stripped: list[str] = field(default_factory=list)  # uncovered modules removed (coverage='strip')
    admission: Admission | None = None  # the in-memory decision (only when computed, not on a cache hit)
    # Seconds per admission stage when computed (validate, score, repair, verify, write; see
    # vllm_safeguard.admission.rules.Admission.times), or {"handover": ...} for a handed-over entry.
    times: dict[str, float] = field(default_factory=dict)


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
    # The artifacts the method declares (vllm_safeguard.methods.base.Method.artifacts), by kind name.
    artifacts: dict[str, Loaded] = field(default_factory=dict)
    cache: RepairCache | None = None
    _base_shapes: dict[str, tuple[int, int]] | None = None
    _digests: dict[tuple[Any, ...], str] = field(default_factory=dict)
    # Per-adapter-name locks (vllm_safeguard.admission.locks): same name serialized, re-checked inside.
    _name_locks: NameLocks = field(default_factory=NameLocks)
    _base_norms: dict[str, float] | None = None  # ||W||_F per module, for max_update_ratio

    @classmethod
    def create(cls, config: SafeguardConfig, ctx: PipelineContext) -> SafeguardPipeline:
        """Load every artifact now, so a misconfiguration shows at startup, not at the first load."""
        from ..methods import METHODS

        if config.method not in METHODS:
            raise ConfigError(
                f"method {config.method!r} is not available in this build (have {sorted(METHODS)})"
            )
        reference: AlignmentReference = locate(REFERENCE, config, ctx.model_name, ctx.model_dir).value
        if ctx.model_dir is not None:
            reference.check_model(ctx.model_dir)
        check = METHODS[config.method].reference_problem
        problem = check(reference) if check else None
        if problem:
            raise ConfigError(problem)
        artifacts: dict[str, Loaded] = {}
        for kind in METHODS[config.method].artifacts:
            loaded = locate(
                kind, config, ctx.model_name, ctx.model_dir, needed_by=f"method {config.method!r}"
            )
            if loaded.reference_hash and loaded.reference_hash != reference.manifest.content_hash:
                raise ReferenceArtifactError(
                    f"{kind.name} was built with another alignment reference "
                    f"({loaded.reference_hash[:12]} != {reference.manifest.content_hash[:12]})"
                )
            artifacts[kind.name] = loaded
        shapes = module_shapes_from_model_dir(ctx.model_dir) if ctx.model_dir is not None else None
        cache = RepairCache(config.cache_dir / "repairs")
        pipeline = cls(config, ctx, reference, artifacts, cache, shapes)
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
        return pipeline

    # ----------------------------------------------------------------- keys
    @property
    def max_rank(self) -> int | None:
        bounds = [r for r in (self.config.max_rank, self.ctx.max_lora_rank) if r is not None]
        return min(bounds) if bounds else None

    def _key(self, digest: str) -> str:
        assert self.reference is not None
        method_cfg = self.config.method_config() | {"max_rank": self.max_rank}
        # The artifacts' content hashes, in the order the method declares them.
        salt = __version__ + "".join(":" + a.content_hash for a in self.artifacts.values())
        ctx = {
            "expected_modules": sorted(self.ctx.expected_modules or ()),
            "served_dtype": str(self.ctx.served_dtype),
            "admission": ADMISSION_VERSION,
            "max_adapter_bytes": self.config.max_adapter_bytes,
            "update_bound_enforced": self._base_norms is not None,
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
                t_hash = time.perf_counter()
                digest = _copy_and_hash(files, stage)
                hashed = time.perf_counter() - t_hash
                self._digests[sig] = digest
                key = self._key(digest)
                if not self.config.cache_enabled:
                    return self._build(stage, key, digest, adapter_name, t0, hashed, publish=False)
                with self.cache.lock(key):  # other processes wait instead of repeating the repair
                    entry = self.cache.get(key)
                    if entry is not None:
                        return self._outcome_from_entry(entry, hit=True, t0=t0)
                    return self._build(stage, key, digest, adapter_name, t0, hashed, publish=True)
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

    def fingerprint(self) -> str:
        """Everything but the adapter's bytes that goes into a key (reference, method, artifacts, served
        context), as one hash: two processes that would key the same bytes alike have the same one."""
        return self._key("0" * 64)

    def entry_key(self, path: str | os.PathLike[str]) -> str | None:
        """The key of ``path`` when it names an entry folder of this pipeline's cache, else None."""
        assert self.cache is not None
        try:
            real = Path(os.path.realpath(path))
            entries = Path(os.path.realpath(self.cache.root / "entries"))
        except (OSError, ValueError):
            return None
        if real.parent.parent != entries:
            return None
        return real.name

    def handed_over(self, path: str | os.PathLike[str]) -> LoadOutcome | None:
        """A cache entry admitted before the engine (by the API server's admission) as this worker's
        outcome, or None when ``path`` is not inside this cache's entries.

        The worker stays the authority: the entry must verify (every file's sha256, RepairCache.get) and
        its key must be the one THIS pipeline derives from the entry's source digest, i.e. admitted
        under this reference, method, artifacts and served context. Anything else is refused.

        Raises:
            AdapterValidationError: a path into the cache that is not such an entry.
        """
        key = self.entry_key(path)
        if key is None:
            return None
        assert self.cache is not None
        t0 = time.perf_counter()
        try:
            entry = self.cache.get(key)
        except ValueError:  # not a key: a made-up folder name
            entry = None
        if entry is None:
            raise AdapterValidationError(
                "not a verified entry of the repair cache (missing, or its bytes do not match its "
                "manifest: tampered or corrupt); load the adapter from its source again",
                file=str(path),
            )
        digest = entry.info.get("source_digest")
        if not isinstance(digest, str) or self._key(digest) != key:
            raise AdapterValidationError(
                "this repair-cache entry was not admitted for this server's reference, method, artifacts "
                "and served context; load the adapter from its source",
                file=str(path),
            )
        outcome = self._outcome_from_entry(entry, hit=True, t0=t0)
        outcome.times = {"handover": outcome.duration_s}
        return outcome

    def _repair_with_deadline(self, adapter: Any, risk: Any) -> Any:
        """Run the method within ``config.repair_timeout_s`` (see vllm_safeguard.admission.limits).

        Only the pure computation runs on the deadline thread; publishing stays on the caller's.
        ``risk`` is admission's score of this very adapter (the method does not score it again).
        """
        from ..methods import repair

        assert self.reference is not None
        reference, config, max_rank = self.reference, self.config, self.max_rank
        artifacts = {name: a.value for name, a in self.artifacts.items()}
        return run_with_deadline(
            lambda: repair(
                adapter,
                reference,
                config.method,
                config.method_options,
                max_rank=max_rank,
                artifacts=artifacts,
                risk=risk,
            ),
            config.repair_timeout_s,
            what=f"repair ({config.method})",
        )

    def _build(
        self,
        stage: Path,
        key: str,
        digest: str,
        adapter_name: str,
        t0: float,
        hashed_s: float,
        *,
        publish: bool,
    ) -> LoadOutcome:
        """Validate the staged copy, admit it (vllm_safeguard.admission.rules), write the canonical folder and
        publish it (or keep it private). Never copies the caller's config or tensors."""
        assert self.reference is not None and self.cache is not None
        t_validate = time.perf_counter()
        adapter = load_adapter(stage, limits=self._limits(), base_shapes=self._base_shapes)
        times = {"validate": hashed_s + time.perf_counter() - t_validate}
        adm = admit(
            adapter,
            self.reference,
            self.rules(),
            self._repair_with_deadline,
            base_norms=self._base_norms,
            expected_modules=self.ctx.expected_modules,
            served_dtype=self.ctx.served_dtype,
        )
        times.update(adm.times)
        report = adm.report.model_dump(mode="json") if adm.report is not None else None
        build_root = self.cache.staging_dir("build-")
        keep = False
        t_write = time.perf_counter()
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
                # The source bytes' digest: lets another process re-derive the key for its own
                # context before it serves this entry (handed_over).
                "source_digest": digest,
            }
            if publish:
                entry = self.cache.put(key, out, info)
                outcome = self._outcome_from_entry(entry, hit=False, t0=t0)
                outcome.admission = adm
                outcome.times = times | {"write": time.perf_counter() - t_write}
                return outcome
            keep = True
            times["write"] = time.perf_counter() - t_write
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
                times=times,
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
