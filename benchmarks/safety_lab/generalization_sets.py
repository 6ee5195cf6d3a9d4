"""The prompt sets of issue 21's lab (``--config generalization``): what trains, what measures.

Semantics::

    (a) harm test         = HarmBench test split (plain), as in the main lab
    (b) harm_b            = every behaviour of cfg.heldout_categories (plain): no training,
                            calibration or test-split prompt comes from these categories
    (c) harm_c            = each test behaviour in one EVAL template (phrasing.py): the behaviour and
                            the wording are both unseen; two registers were never seen at all
    benign_vocab_test     = the vocabulary-sharing benign prompts' test half
    benign_wrapped_test   = the first n benign test prompts in one EVAL template each
    alignment rows        += train behaviours in TRAIN templates (refusal) and benign train prompts in
                            TRAIN templates + the vocabulary train half + the vocabulary pool in
                            HarmBench's imperative style (the base model's own answers)

Every set is a pure function of the lab config and the data split (seeded), so runs agree.
"""

from __future__ import annotations

from typing import Any

from benchmarks.safety_lab.config import LabConfig
from vllm_safeguard.prepare import phrasing as P

SET_NAMES = {
    "a": "HarmBench test split",
    "b": "held-out HarmBench categories",
    "c": "test behaviours, unseen rephrasings",
}


def generalization_sets(cfg: LabConfig, data: dict[str, Any]) -> dict[str, Any]:
    harm, benign = data["harm"], data["benign"]
    vocab = P.vocabulary_benign(cfg.split_seed)
    c = P.rephrase(harm["test"], "eval", 1, seed=cfg.split_seed)
    wrapped_test = P.rephrase(benign["test"][: cfg.n_benign_wrapped_test], "eval", 1, seed=cfg.split_seed)
    wrapped_align = P.rephrase(benign["train"][: cfg.n_benign_wrapped_align], "train", 1, seed=cfg.split_seed)
    return {
        "harm_b": list(harm.get("heldout_categories", [])),
        "harm_c": [p for p, _ in c],
        "harm_c_registers": [r for _, r in c],
        "benign_vocab_train": vocab["train"],
        "benign_vocab_test": vocab["test"],
        "benign_wrapped_test": [p for p, _ in wrapped_test],
        "benign_wrapped_align": [p for p, _ in wrapped_align],
        "harm_train_rephrased_align": [
            p for p, _ in P.rephrase(harm["train"], "train", cfg.align_rephrasings, seed=cfg.split_seed)
        ]
        if cfg.align_rephrasings
        else [],
    }


def align_benign_prompts(cfg: LabConfig, data: dict[str, Any]) -> list[str]:
    """The benign prompts the base model answers for the alignment's own-answer rows."""
    out = list(data["benign"]["train"][: cfg.n_benign_align])
    if cfg.align_rephrasings:
        g = data["generalization"]
        out += g["benign_vocab_train"] + g["benign_wrapped_align"]
        if cfg.align_vocabulary_pool:
            out += P.vocabulary_pool()
    return out


def harmful_set_of(cfg: LabConfig, data: dict[str, Any]) -> dict[str, str]:
    """prompt -> "a" | "b" | "c" for the harmful prompts of the evaluation suite."""
    g = data["generalization"]
    out = {p: "a" for p in data["harm"]["test"]}
    out.update({p: "b" for p in g["harm_b"]})
    out.update({p: "c" for p in g["harm_c"]})
    return out


def benign_set_of(data: dict[str, Any]) -> dict[str, str]:
    g = data["generalization"]
    out = {p: "plain" for p in data["benign"]["test"]}
    out.update({p: "vocabulary" for p in g["benign_vocab_test"]})
    out.update({p: "wrapped" for p in g["benign_wrapped_test"]})
    return out
