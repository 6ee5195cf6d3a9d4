"""Exact answer checkers of the built-in task domains (used by ``vllm-safeguard eval`` and the lab).

Each checker reads the first answer-like token of a generation: ``(generation, answer) -> correct``.
:data:`DOMAIN_CHECKERS` maps every built-in domain name to its checker; the safety lab's domain
definitions (``vllm_safeguard/prepare/data.py``) take their checkers from this table, so each
domain's checker is defined once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Checker = Callable[[str, str], bool]

_NUM_RE = re.compile(r"-?\d[\d,]*")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def first_number(text: str) -> str | None:
    """First integer in ``text`` with thousands separators removed (``"1,000 m"`` -> ``"1000"``)."""
    m = _NUM_RE.search(text)
    return m.group(0).replace(",", "") if m else None


def check_number(generation: str, answer: str) -> bool:
    """The first number in the generation equals the expected integer."""
    got = first_number(generation)
    return got is not None and got.lstrip("-").isdigit() and int(got) == int(answer)


def check_weekday(generation: str, answer: str) -> bool:
    """The first weekday named in the generation is the expected one."""
    m = re.search("|".join(DAYS), generation)
    return m is not None and m.group(0) == answer


def check_sorted_list(generation: str, answer: str) -> bool:
    """The first ``len(answer)`` numbers of the generation are the expected sorted list."""
    want = [int(x) for x in answer.split(", ")]
    got = [int(x) for x in re.findall(r"-?\d+", generation)[: len(want)]]
    return got == want


def check_word(generation: str, answer: str) -> bool:
    """The first word of the generation is the expected one (case-insensitive)."""
    m = re.search(r"[A-Za-z]+", generation)
    return m is not None and m.group(0).lower() == answer.lower()


#: Every built-in task domain -> its exact checker.
DOMAIN_CHECKERS: dict[str, Checker] = {
    "arithmetic": check_number,
    "units": check_number,
    "weekday": check_weekday,
    "sorting": check_sorted_list,
    "maximum": check_number,
    "opposite": check_word,
    "multiply": check_number,
    "subtract": check_number,
    "length": check_number,
    "plural": check_word,
}
