"""A corpus of hostile PEFT LoRA adapter folders, each with the refusal it must cause.

Every attack is a named function that writes one adapter folder (bytes crafted by hand where the
safetensors header itself is the attack: 8-byte little-endian header length + JSON + data) and is
registered in :data:`ATTACKS` with the substring the :class:`AdapterValidationError` message must
contain and the file the error must name. The attacks sit by target: :mod:`.header` (the safetensors
framing), :mod:`.tensors` (values, names, shapes), :mod:`.config` (``adapter_config.json``) and
:mod:`.files` (the folder; and :data:`PATH_ATTACKS`); :mod:`.parts` holds the registry and the good
adapter they mutate. The same corpus can be replayed against a live server::

    python -m vllm_safeguard.testing.attacks OUT_DIR [--base-model MODEL_DIR]

writes ``OUT_DIR/attacks/<name>/`` for every attack, ``OUT_DIR/good/`` (a valid adapter, the
control), ``OUT_DIR/base_model/`` (a tiny random Llama, unless ``--base-model`` is given: then the
adapters are shaped for that model) and ``OUT_DIR/manifest.json``::

    {"base_model": ..., "good": ..., "attacks": [{"name", "path", "expected", "culprit", "description"}],
     "path_attacks": [{"name", "request_path", "expected", "symlink_target"}]}

Replaying (e.g. ``POST /v1/load_lora_adapter {"lora_name": name, "lora_path": path}``) must refuse
every attack, with ``expected`` in the error text, and accept ``good``. ``path_attacks`` are request
paths (``lora_path`` values) that :func:`vllm_safeguard.admission.paths.contained_path` must refuse when the
adapter root is ``OUT_DIR/attacks``; ``{root}`` in a request path stands for that root.

Nothing in the corpus executes anything: the pickle checkpoint holds a harmless ``print`` canary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...core.model_files import module_shapes_from_model_dir
from ..corpus import corpus_parser, fresh_dir, write_manifest
from . import config, files, header, tensors
from .files import PATH_ATTACKS, PICKLE_CANARY
from .parts import (
    ALPHA,
    ATTACKS,
    FOLDER,
    RANK,
    Attack,
    PathAttack,
    Shapes,
    Writer,
    attack,
    good_config,
    good_tensors,
    split_safetensors,
    target_modules,
    write_config,
    write_good,
    write_tensors,
    write_weights,
)

# Importing the attack modules registered their attacks. The corpus order (ATTACKS, the manifest) is
# framing, tensors, config, folder; within a module, the order of definition.
_ORDER = [m.__name__ for m in (header, tensors, config, files)]
ATTACKS.sort(key=lambda a: _ORDER.index(a.writer.__module__))

__all__ = [
    "ALPHA",
    "ATTACKS",
    "FOLDER",
    "PATH_ATTACKS",
    "PICKLE_CANARY",
    "RANK",
    "Attack",
    "PathAttack",
    "Shapes",
    "Writer",
    "attack",
    "good_config",
    "good_tensors",
    "main",
    "split_safetensors",
    "target_modules",
    "write_config",
    "write_corpus",
    "write_good",
    "write_tensors",
    "write_weights",
]


def write_corpus(out_dir: str | os.PathLike[str], base_model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write every attack, the good control and the manifest under ``out_dir``; return the manifest."""
    out = Path(out_dir)
    shapes = module_shapes_from_model_dir(base_model_dir)
    root = fresh_dir(out / "attacks")
    good = fresh_dir(out / "good")
    write_good(good, shapes)
    entries = []
    for a in ATTACKS:
        path = a.build_for_shapes(root / a.name, shapes)
        entries.append(
            {
                "name": a.name,
                "path": str(path),
                "expected": a.expected,
                "culprit": a.culprit,
                "description": a.description,
            }
        )
    for p in PATH_ATTACKS:
        if p.symlink_target is not None:
            os.symlink(p.symlink_target, root / p.request_path)
    manifest = {
        "base_model": str(Path(base_model_dir).resolve()),
        "good": str(good),
        "adapter_root": str(root),
        "attacks": entries,
        "path_attacks": [
            {
                "name": p.name,
                "request_path": p.request_path,
                "expected": p.expected,
                "symlink_target": p.symlink_target,
            }
            for p in PATH_ATTACKS
        ],
    }
    return write_manifest(out, manifest)


def main(argv: list[str] | None = None) -> int:
    ap = corpus_parser(__name__, __doc__, "HF model folder (default: a tiny random Llama)")
    args = ap.parse_args(argv)
    base = args.base_model
    if base is None:
        from ..tiny import make_tiny_llama

        base = make_tiny_llama(args.out_dir / "base_model")
    manifest = write_corpus(args.out_dir, base)
    print(f"wrote {len(manifest['attacks'])} attacks and the good control to {args.out_dir}")
    print(f"{len(manifest['path_attacks'])} request-path attacks listed in {args.out_dir / 'manifest.json'}")
    return 0
