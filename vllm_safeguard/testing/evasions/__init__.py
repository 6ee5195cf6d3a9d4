"""A corpus of *well-formed* adapters built to slip past scoring and repair, each with the outcome it must get.

The parser corpus (:mod:`vllm_safeguard.testing.attacks`) holds bytes no loader should accept. This one holds
adapters that parse fine but try to get an update served that nothing scored or repaired (issue 16,
"load-path integrity"). Every case is a named writer registered with :func:`evasion`: it writes one
adapter folder for a base model and its alignment reference, and states its class (the attacker's
finding it replays), the outcome and the text the refusal must contain::

    1 uncovered modules (lm_head, embed_tokens, a target_modules regex)  -> refused_uncovered
    2 "high risk, nothing changed" (a method that cannot change it)     -> refused_unrepairable
    3 non-finite decision values (dead rank components, 1e30 updates)   -> refused_invalid / neutralized
    4 config semantics (rank/alpha patterns vLLM reads as regexes)       -> scored as vLLM serves it
    5 risk pooling (dilution by harmless modules, over-cancelling)       -> worst module decides
    6 source folder deleted / replaced after admission (reloads)         -> the admitted bytes only
    7 fields vLLM refuses late (bias, PiSSA, QALoRA, aLoRA, ...)          -> refused_invalid, no repair

Outcomes are the labels of ``safeguard_adapter_loads_total``: ``passed``, ``repaired``,
``refused_invalid``, ``refused_uncovered``, ``refused_unrepairable``. An accepted case (passed or
repaired) is one the canonical form neutralizes: what is served is then exactly what was scored.

Each case runs under a :data:`PROFILES` entry (the plugin config and the served dtype):

* ``main``: method ``nlsr_datafree`` with ``neuron_fraction`` 0.5, ``risk_threshold`` 0.1, fp32 (the e2e server's
  config; on the tiny workspace it repairs the textbook unsafe adapter from risk 1.0 to ~0.03);
* ``noop``: method ``safelora_subspace`` at threshold 0 (it never lowers this workspace's risk: class 2);
* ``strip``: ``main`` with ``coverage: strip``; ``fp16``: ``main`` served in fp16.

The registry, outcomes, profiles and factor builders are in :mod:`.parts`, the cases in :mod:`.cases`.
Class 6 cases carry a ``replacement`` (written over the source after admission; ``None`` deletes it).
The corpus can be written for a live server::

    python -m vllm_safeguard.testing.evasions OUT_DIR [--base-model DIR --reference DIR] [--profile main]

writes ``OUT_DIR/evasions/<name>/`` (and ``<name>.replacement/`` for class 6) and
``OUT_DIR/manifest.json`` (``{"base_model", "reference", "profiles", "evasions": [{"name", "cls",
"expected", "expect_in_reason", "profile", "path", "replacement", "description"}]}``). Without
``--base-model`` a tiny workspace (model + reference) is built in ``OUT_DIR/ws``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..corpus import corpus_parser, fresh_dir, write_manifest
from . import cases  # noqa: F401  (importing it registers the cases in EVASIONS)
from .parts import (
    ACCEPTED,
    CLASSES,
    EVASIONS,
    LLAMA_VLLM_MODULES,
    OUTCOMES,
    PROFILES,
    Evasion,
    EvasionContext,
    Factors,
    Profile,
    Writer,
    benign_factors,
    direction_factors,
    evasion,
    scaled,
    unsafe_factors,
    write_lora,
)

__all__ = [
    "ACCEPTED",
    "CLASSES",
    "EVASIONS",
    "LLAMA_VLLM_MODULES",
    "OUTCOMES",
    "PROFILES",
    "Evasion",
    "EvasionContext",
    "Factors",
    "Profile",
    "Writer",
    "benign_factors",
    "direction_factors",
    "evasion",
    "main",
    "scaled",
    "unsafe_factors",
    "write_corpus",
    "write_lora",
]


def write_corpus(
    out_dir: str | os.PathLike[str],
    base_model_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str],
    *,
    profiles: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write every case (of ``profiles``; all by default) and the manifest under ``out_dir``."""
    out = Path(out_dir)
    ctx = EvasionContext.from_dirs(base_model_dir, reference_dir)
    root = fresh_dir(out / "evasions")
    entries = []
    for e in EVASIONS:
        if profiles is not None and e.profile not in profiles:
            continue
        path = e.build(root / e.name, ctx)
        repl = None  # class 6 without a replacement: the source is deleted
        if e.replacement is not None:
            repl = str(root / f"{e.name}.replacement")
            Path(repl).mkdir()
            e.replacement(Path(repl), ctx)
        fields = ("name", "cls", "expected", "expect_in_reason", "profile", "description")
        entries.append({k: getattr(e, k) for k in fields} | {"path": str(path), "replacement": repl})
    manifest = {
        "base_model": str(Path(base_model_dir).resolve()),
        "reference": str(Path(reference_dir).resolve()),
        "profiles": {
            k: {"config": dict(p.config), "served_dtype": p.served_dtype} for k, p in PROFILES.items()
        },
        "evasions": entries,
    }
    return write_manifest(out, manifest)


def main(argv: list[str] | None = None) -> int:
    ap = corpus_parser(__name__, __doc__, "HF model folder (default: a tiny workspace)")
    ap.add_argument("--reference", type=Path, default=None, help="AlignmentReference folder of that model")
    ap.add_argument("--profile", action="append", choices=sorted(PROFILES), help="only these profiles")
    args = ap.parse_args(argv)
    base, ref = args.base_model, args.reference
    if base is None or ref is None:
        if base is not None or ref is not None:
            ap.error("--base-model and --reference go together")
        from ..workspace import prepare_tiny_workspace

        ws = prepare_tiny_workspace(args.out_dir / "ws", n_benign=1)
        base, ref = ws.base, ws.reference
    manifest = write_corpus(args.out_dir, base, ref, profiles=tuple(args.profile) if args.profile else None)
    print(f"wrote {len(manifest['evasions'])} evasion cases to {args.out_dir / 'evasions'}")
    return 0
