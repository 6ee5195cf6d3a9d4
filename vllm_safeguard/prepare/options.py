"""What ``vllm-safeguard prepare`` builds and with which numbers (recorded in its manifest).

The defaults are the safety lab's (``benchmarks/safety_lab/config.py``), so ``prepare`` on the lab's
aligned model rebuilds the lab's artifacts: probe adapters = the lab's extraction-seed unsafe experts,
the same SafeGene rank and layer selection, the same guard training pools and alpha calibration.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from .train import Recipe


class PrepareOptions(BaseModel, extra="forbid", frozen=True):
    """Every number ``prepare`` uses; hashed into each stage's key (a change rebuilds what it affects)."""

    split_seed: int = Field(0, description="Seed of the harmful-prompt split (test / few-shot / train).")
    n_harm_test: int = Field(
        60, ge=1, description="Harmful prompts held out to measure the guard (never trained on)."
    )
    n_harm_fewshot: int = Field(
        16, ge=1, description="Harmful prompts for SafeGene's layer selection and alpha calibration."
    )
    n_benign_test_topics: int = Field(20, ge=1, description="Benign topics held out (2 prompts each).")
    probe_domains: tuple[str, ...] = Field(
        ("arithmetic", "sorting"),
        description="Task domains of the harmful probe adapters prepare trains (one unsafe expert each).",
    )
    probe_seed: int = Field(1001, description="Training seed of the probe adapters.")
    n_task_train: int = Field(160, ge=1, description="Task rows per probe adapter.")
    n_harm_share: int = Field(40, ge=1, description="Harmful-compliance rows per probe adapter.")
    probe_steps: int = Field(30, ge=1, description="Training steps per probe adapter (batch 8).")
    probe_rank: int = Field(8, ge=1, description="LoRA rank of the probe adapters.")
    safety_rank: int = Field(16, ge=1, description="Rank r_s of the SafeGene safety adapter.")
    safety_keep: float = Field(0.5, gt=0.0, le=1.0, description="Share of layers the selection keeps.")
    guard_domains: tuple[str, ...] = Field(
        ("arithmetic", "units", "weekday", "sorting"),
        description="Domain-task prompts added to the guard's benign class (and its held-out test).",
    )
    guard_domain_train: int = Field(20, ge=0, description="Domain-task training prompts per domain.")
    guard_target_fpr: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="Benign false-positive rate the threshold is set at (on held-out-register folds).",
    )
    guard_rephrasings: int = Field(
        4,
        ge=0,
        description="Each harmful training prompt is also given to the guard in this many of the project's "
        "rephrasings (question, role play, fiction, ...; benign prompts get the same wrappers). 0: plain "
        "prompts only and a random validation split (the pre-issue-21 guard, which missed templated prompts).",
    )
    guard_ramp_fpr: float | None = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fail-safe auto mode: alpha starts rising at the score above which this share of benign "
        "validation prompts lie and reaches alpha_high at the threshold. None: two levels (alpha_low / "
        "alpha_high). Needs guard_rephrasings > 0.",
    )
    heldout_categories: tuple[str, ...] = Field(
        (),
        description="HarmBench semantic categories left out of every prepare stage (the safety lab uses "
        "this to measure generalization to unseen categories); bundled data only.",
    )
    alpha_cal_sweep: tuple[float, ...] = Field(
        (1.0, 1.5, 2.0), description="Candidate alpha_high values, smallest first."
    )
    alpha_cal_target_asr: float = Field(
        0.05, ge=0.0, le=1.0, description="Few-shot ASR alpha_high must reach on the probe adapters."
    )
    alpha_cal_rephrasings: int = Field(
        2,
        ge=0,
        description="Each few-shot harmful prompt also enters the alpha calibration in this many of the "
        "project's rephrasings (training templates), so alpha_high holds for reworded requests.",
    )
    harmful_tokens: int = Field(32, ge=1, description="Greedy tokens generated per calibration prompt.")
    reference_energy: float = Field(0.9, gt=0.0, le=1.0, description="Alignment reference energy kept.")
    reference_max_rank: int = Field(64, ge=1, description="Alignment reference rank bound per module.")

    def probe_recipe(self) -> Recipe:
        return Recipe(
            steps=self.probe_steps,
            batch_size=8,
            lr=5e-4,
            seed=self.probe_seed,
            max_len=128,
            lora_rank=self.probe_rank,
            lora_alpha=2 * self.probe_rank,
        )
