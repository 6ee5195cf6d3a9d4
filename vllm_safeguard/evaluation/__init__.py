"""Evaluation harness: refusal judges, batched greedy generation, ASR / over-refusal / fidelity with CIs."""

from .judge import REFUSAL_PREFIXES, Judge, KeywordRefusalJudge, get_judge
from .stats import Rate, fidelity, wilson_interval

__all__ = [
    "REFUSAL_PREFIXES",
    "Judge",
    "KeywordRefusalJudge",
    "Rate",
    "fidelity",
    "get_judge",
    "wilson_interval",
]
