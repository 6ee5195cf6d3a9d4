"""A self-contained tiny serving workspace: base model, aligned model, reference and test adapters.

Shared by the demo, the end-to-end tests and the serving benchmark, so that all three exercise the
same artifacts. Everything is random and small (a 2-layer Llama that vLLM CPU serves in seconds), but
the alignment structure is real: the "aligned" model differs from the base by a low-rank update, the
reference is built from the two folders, and the *unsafe* adapter is the one that undoes that update
(risk ~1), while the *benign* adapters are random (risk ~0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.adapter import LoRAAdapter, LoRAModule
from ..core.adapter_io import save_adapter
from .tiny import LLAMA_TARGETS, TinyLlamaSpec, make_tiny_llama, perturb_model, random_adapter

# vLLM's CPU attention supports head sizes 32, 64, 80, ...: TinyLlamaSpec's default (hidden 64 with
# 4 heads -> head_dim 16) builds a model vLLM CPU refuses at the first forward pass.
VLLM_TINY_SPEC = TinyLlamaSpec()  # the default spec is vLLM-CPU compatible (head_dim 32)


@dataclass
class Workspace:
    """Paths of one prepared workspace."""

    root: Path
    base: Path  # the served model ("aligned" in deployment terms is the one the reference protects)
    unaligned: Path
    reference: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def unsafe_adapter(reference_dir: Path, *, rank: int = 4, strength: float = 1.0) -> LoRAAdapter:
    """An adapter whose update is ``-strength`` times the reference's top alignment directions.

    Serving it undoes the alignment (the kind of adapter the plugin exists to catch).
    """
    from ..core.reference import AlignmentReference

    ref = AlignmentReference.load(reference_dir)
    modules: dict[str, LoRAModule] = {}
    for name, sub in sorted(ref.modules.items()):
        k = min(rank, sub.rank)
        a = torch.zeros(rank, sub.vh.shape[1])
        b = torch.zeros(sub.u.shape[0], rank)
        a[:k] = sub.vh[:k]
        b[:, :k] = -strength * sub.u[:, :k] * sub.s[:k]
        modules[name] = LoRAModule(name, a, b, 1.0)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    return LoRAAdapter(config=cfg, modules=modules)


def write_hostile_adapter(folder: Path, like: Path) -> Path:
    """A copy of adapter ``like`` whose safetensors header lies about a tensor's extent (refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_bytes((like / "adapter_config.json").read_bytes())
    raw = (like / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4096  # points past the end of the file
    new = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    return folder


def prepare_tiny_workspace(
    root: str | os.PathLike[str],
    *,
    n_benign: int = 2,
    spec: TinyLlamaSpec = VLLM_TINY_SPEC,
    seed: int = 0,
) -> Workspace:
    """Build (or reuse, if complete) a tiny workspace under ``root``. Idempotent."""
    from ..core.reference import AlignmentReference

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = root / ".done"
    ws = Workspace(
        root=root,
        base=root / "model",
        unaligned=root / "model-unaligned",
        reference=root / "model" / "safeguard" / "reference",
    )
    names = ["unsafe"] + [f"benign{i}" for i in range(n_benign)] + ["hostile"]
    ws.adapters = {n: root / "adapters" / n for n in names}
    if done.exists() and done.read_text() == json.dumps(names):
        return ws
    # The served model is the aligned one; the "unaligned" twin differs by a low-rank update, which
    # plays the role of what safety training added.
    make_tiny_llama(ws.unaligned, spec, seed=seed)
    perturb_model(ws.unaligned, ws.base, seed=seed + 1, rank=4, scale=0.5)
    ref = AlignmentReference.build(ws.base, ws.unaligned, energy=0.95, max_rank=8, progress=False)
    ref.save(ws.reference)
    save_adapter(unsafe_adapter(ws.reference, rank=4), ws.adapters["unsafe"])
    for i in range(n_benign):
        save_adapter(
            random_adapter(spec, rank=4, alpha=8.0, seed=100 + i, targets=LLAMA_TARGETS, scale=0.2),
            ws.adapters[f"benign{i}"],
        )
    write_hostile_adapter(
        ws.adapters["hostile"], ws.adapters["benign0"] if n_benign else ws.adapters["unsafe"]
    )
    done.write_text(json.dumps(names))
    return ws
