"""Per-worker plugin state and how the served model is named (shared by every worker-side module).

The ``WorkerLoRAManager.__init__`` patch attaches a :class:`WorkerState` to each LoRA manager under
:data:`STATE_ATTR`; the adapter hook, the alpha path and the API-side checks read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..admission.pipeline import SafeguardPipeline
    from ..config import SafeguardConfig

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
    instance: str = ""  # vLLM's engine instance id (shared by this engine's workers and API server)
    # A canonical adapter with a zero update, for requests whose adapter cannot be loaded in a step.
    zero_adapter: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.config is None or self.config.enabled  # no config (it failed) -> fail closed


def model_dir(model: str) -> Path | None:
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    try:  # a hub id: the snapshot vLLM already downloaded
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


def served_model_name(vllm_config: Any) -> str:
    """The name clients use for the base model (first ``--served-model-name``, else ``--model``)."""
    model_cfg = vllm_config.model_config
    served = model_cfg.served_model_name
    return str(served[0] if isinstance(served, list) else served or model_cfg.model)
