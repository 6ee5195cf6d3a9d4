"""Per-module and per-adapter repair reports (pydantic, JSON-serializable)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Action = Literal["kept", "projected", "transplanted", "safety_added", "translated", "unmatched"]


class ModuleReport(BaseModel):
    module: str = Field(description="Module path, e.g. model.layers.3.self_attn.q_proj.")
    layer: int | None = Field(None, description="Transformer block index.")
    risk: float = Field(0.0, description="Module risk in [0, 1] (see risk.py).")
    subspace_energy: float = Field(
        0.0, description="Share of the update's energy inside the alignment subspace."
    )
    similarity: float | None = Field(None, description="Method-specific similarity that drove the decision.")
    action: Action = "kept"
    rank_in: int = 0
    rank_out: int = 0
    energy_kept: float | None = Field(None, description="Energy kept when the output was re-factorized.")
    extra: dict[str, float] = Field(default_factory=dict)


class RepairReport(BaseModel):
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    risk_score: float = Field(0.0, description="Adapter risk in [0, 1] before repair.")
    modules_total: int = 0
    modules_matched: int = Field(0, description="Adapter modules the reference covers.")
    modules_touched: int = Field(0, description="Modules whose update the repair changed.")
    layers_repaired: int = Field(0, description="Distinct transformer blocks with a touched module.")
    max_rank_out: int = 0
    duration_s: float = 0.0
    modules: list[ModuleReport] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict, description="Method-specific adapter-level facts.")

    def summary_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(module, risk, similarity, action, rank) rows for a console table."""
        return [
            (
                m.module,
                f"{m.risk:.3f}",
                "-" if m.similarity is None else f"{m.similarity:.3f}",
                m.action,
                f"{m.rank_in}->{m.rank_out}",
            )
            for m in self.modules
        ]
