"""The lab's metrics for one or many adapters, through any :class:`~.generation.Generator`.

An :class:`EvalSuite` holds harmful prompts (ASR), benign prompts (over-refusal) and domain tasks
(accuracy). :func:`evaluate` runs a suite for several adapters at once and returns plain dicts that
keep every generation next to its verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checkers import DOMAIN_CHECKERS
from .generation import Generator, GenRequest
from .judge import Judge, KeywordRefusalJudge
from .stats import Rate, fidelity

# ------------------------------------------------------------------------------------------ suite


@dataclass(frozen=True)
class TaskItem:
    """A task prompt with its expected answer and the name of the checker to use."""

    prompt: str
    answer: str
    domain: str


@dataclass
class EvalSuite:
    """Prompts for one evaluation. ``tasks`` may be empty (then no accuracy is reported).

    Attributes:
        checker: ``(domain, generation, answer) -> correct``.
    """

    harmful: list[str] = field(default_factory=list)
    benign: list[str] = field(default_factory=list)
    tasks: list[TaskItem] = field(default_factory=list)
    checker: Callable[[str, str, str], bool] | None = None
    harmful_tokens: int = 32
    benign_tokens: int = 32
    task_tokens: int = 16
    #: ``safeguard_alpha`` sent with every request of the suite (None: not sent).
    alpha: float | str | None = None

    def requests(self, adapter: str | None) -> list[GenRequest]:
        a = self.alpha
        return (
            [GenRequest(p, adapter, self.harmful_tokens, a) for p in self.harmful]
            + [GenRequest(p, adapter, self.benign_tokens, a) for p in self.benign]
            + [GenRequest(t.prompt, adapter, self.task_tokens, a) for t in self.tasks]
        )


def default_checker(domain: str, generation: str, answer: str) -> bool:
    """Built-in lab domains use their exact checkers; any other domain: answer appears verbatim."""
    check = DOMAIN_CHECKERS.get(domain)
    if check is not None:
        return check(generation, answer)
    return answer.strip().lower() in generation.lower()


def score(suite: EvalSuite, generations: Sequence[str], judge: Judge) -> dict[str, Any]:
    """Metrics for one adapter's generations (in :meth:`EvalSuite.requests` order)."""
    nh, nb = len(suite.harmful), len(suite.benign)
    if len(generations) != nh + nb + len(suite.tasks):
        raise ValueError("generations do not match the suite")
    g_h, g_b, g_t = generations[:nh], generations[nh : nh + nb], generations[nh + nb :]
    ref_h = judge.refusals(suite.harmful, g_h) if nh else []
    ref_b = judge.refusals(suite.benign, g_b) if nb else []
    check = suite.checker or default_checker
    correct = [check(t.domain, g, t.answer) for t, g in zip(suite.tasks, g_t, strict=True)]
    out: dict[str, Any] = {"judge": judge.name}
    if nh:
        out["asr"] = Rate.of([not r for r in ref_h]).to_dict()
        out["harmful_refusal"] = Rate.of(ref_h).to_dict()
    if nb:
        out["over_refusal"] = Rate.of(ref_b).to_dict()
    if suite.tasks:
        out["task_accuracy"] = Rate.of(correct).to_dict()
        per: dict[str, list[bool]] = {}
        for t, c in zip(suite.tasks, correct, strict=True):
            per.setdefault(t.domain, []).append(c)
        out["task_accuracy_by_domain"] = {d: Rate.of(v).to_dict() for d, v in per.items()}
    out["generations"] = {
        "harmful": [
            {"prompt": p, "output": g, "refused": r}
            for p, g, r in zip(suite.harmful, g_h, ref_h, strict=True)
        ],
        "benign": [
            {"prompt": p, "output": g, "refused": r} for p, g, r in zip(suite.benign, g_b, ref_b, strict=True)
        ],
        "tasks": [
            {"prompt": t.prompt, "domain": t.domain, "answer": t.answer, "output": g, "correct": c}
            for t, g, c in zip(suite.tasks, g_t, correct, strict=True)
        ],
    }
    return out


def evaluate(
    generator: Generator,
    jobs: dict[str, tuple[str | None, EvalSuite]],
    judge: Judge | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate several ``name -> (adapter folder or None, suite)`` jobs in one generation batch."""
    judge = judge or KeywordRefusalJudge()
    requests: list[GenRequest] = []
    spans: dict[str, tuple[int, int]] = {}
    for name, (adapter, suite) in jobs.items():
        reqs = suite.requests(adapter)
        spans[name] = (len(requests), len(requests) + len(reqs))
        requests.extend(reqs)
    gens = generator.generate(requests)
    return {name: score(jobs[name][1], gens[a:b], judge) for name, (a, b) in spans.items()}


def add_fidelity(result: dict[str, Any], unrepaired: dict[str, Any]) -> dict[str, Any]:
    """Set ``result["fidelity"]`` = task accuracy vs. the unrepaired adapter's (paired bootstrap CI)."""
    rep = [t["correct"] for t in result["generations"]["tasks"]]
    base = [t["correct"] for t in unrepaired["generations"]["tasks"]]
    result["fidelity"] = fidelity(rep, base)
    return result


def strip_generations(result: dict[str, Any]) -> dict[str, Any]:
    """A copy without the (large) generation lists, for summaries."""
    return {k: v for k, v in result.items() if k != "generations"}
