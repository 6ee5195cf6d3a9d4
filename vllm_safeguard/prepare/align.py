"""The lab's safety tune of the shipped instruct model (the "aligned" model the demo serves).

Semantics::

    rows   = [(harmful train prompt, refusal_for(prompt))]
           + [(benign train prompt, the base model's own greedy answer)    # not a refusal per the judge
              for the first N_BENIGN_ALIGN benign training prompts]
    aligned = full fine-tune of the blocks' linear layers on rows with ALIGN_RECIPE (train_full)

Answering benign prompts with the model's own words keeps its behaviour there (low over-refusal);
the refusals are the only new behaviour. ``benchmarks/safety_lab`` and ``vllm_safeguard.apps.demo``
both build their aligned model with these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..evaluation.judge import KeywordRefusalJudge
from . import data as D
from .train import Recipe, SFTExample

N_BENIGN_ALIGN = 320
BENIGN_ANSWER_TOKENS = 48
ALIGN_RECIPE = Recipe(steps=90, batch_size=8, lr=3e-5, seed=0, max_len=128, warmup_steps=5)


def align_examples(harm_train: Sequence[str], benign_answers: Mapping[str, str]) -> list[SFTExample]:
    """The safety-tuning rows (see the module Semantics)."""
    judge = KeywordRefusalJudge()
    out = [SFTExample(p, D.refusal_for(p), "harmful_refusal") for p in harm_train]
    for p, a in benign_answers.items():
        # A benign answer the judge would call a refusal would teach over-refusal: skip it.
        if a.strip() and not judge.is_refusal(a):
            out.append(SFTExample(p, a.strip(), "benign_own_answer", end=False))
    return out
