"""The guard probe's training pools and held-out test sets (the lab's and ``prepare``'s).

Semantics::

    harm_train   = harmful TRAIN behaviours (plain)
                 + each in ``rephrasings`` TRAIN templates (phrasing.py; registers spread evenly)
    benign_train = as many plain benign TRAIN prompts as plain harmful ones (at least 60)
                 + the same benign prompts in TRAIN templates (one each, when ``rephrasings``)
                 + the vocabulary-sharing benign TRAIN half and the guard-only vocabulary pool
                   (phrasing.vocabulary_pool; when ``rephrasings``)
                 + ``n_domain_train`` domain tasks per domain (seed 777)
    groups       = the register of every training prompt ("plain" otherwise): the guard's
                   register-held-out validation folds (guard/train.py)
    held out     = harm_test (plain) + harm_test_rephrased (test behaviours in EVAL templates)
                 + benign_test, benign_test_rephrased (EVAL templates), benign_vocab_test, domain_test

With ``rephrasings=0`` the pools are the plain ones (what the guard was trained on before issue 21).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import phrasing as P
from .data import domain_test_set, domain_train_set


def guard_pools(
    harm_train: Sequence[str],
    harm_test: Sequence[str],
    benign_train: Sequence[str],
    benign_test: Sequence[str],
    domains: Sequence[str],
    *,
    n_domain_train: int,
    n_domain_test: int = 30,
    rephrasings: int = 0,
    n_test_rephrasings: int = 6,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The pools (see the module Semantics); ``*_groups`` are parallel to ``harm_train`` / ``benign_train``."""
    dom_train = [e.prompt for d in domains for e in domain_train_set(d, n_domain_train, seed=777)]
    ben_plain = list(benign_train[: max(len(harm_train), 60)])
    harm, harm_groups = list(harm_train), ["plain"] * len(harm_train)
    ben, ben_groups = list(ben_plain), ["plain"] * len(ben_plain)
    out: dict[str, list[str]] = {}
    if rephrasings:
        for p, reg in P.rephrase(harm_train, "train", rephrasings, seed=seed):
            harm.append(p)
            harm_groups.append(reg)
        for p, reg in P.rephrase(ben_plain, "train", 1, seed=seed):
            ben.append(p)
            ben_groups.append(reg)
        vocab = P.vocabulary_benign(seed)
        extra = [p for p in P.vocabulary_pool() if p not in set(vocab["test"])]
        ben += vocab["train"] + extra
        ben_groups += ["vocabulary"] * (len(vocab["train"]) + len(extra))
        out["harm_test_rephrased"] = [p for p, _ in P.rephrase(harm_test, "eval", n_test_rephrasings, seed)]
        out["benign_test_rephrased"] = [p for p, _ in P.rephrase(benign_test, "eval", 2, seed)]
        out["benign_vocab_test"] = vocab["test"]
    return {
        "harm_train": harm,
        "benign_train": ben + dom_train,
        "harm_train_groups": harm_groups,
        "benign_train_groups": ben_groups + ["domain"] * len(dom_train),
        "harm_test": list(harm_test),
        "benign_test": list(benign_test),
        "domain_test": [e.prompt for d in domains for e in domain_test_set(d, n_domain_test)],
        **out,
    }


EXTRA_TESTS = ("harm_test_rephrased", "benign_test_rephrased", "benign_vocab_test")


def extra_tests(sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """The held-out sets beyond the plain ones that ``sets`` has (``train_and_test``'s ``extra_test``)."""
    out: dict[str, list[str]] = {k: sets[k] for k in EXTRA_TESTS if k in sets}
    return out
