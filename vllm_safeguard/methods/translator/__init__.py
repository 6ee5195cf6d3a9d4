"""NeWTral: a learned translator from unsafe to safe LoRA adapters (mixture of experts).

``representation.py`` (how an adapter module is seen: output basis, features, shrinks), ``model.py``
(experts + router, the artifact), ``train.py`` (training on unsafe->safe pairs), ``repair.py`` (the
load-time repair).
"""

from __future__ import annotations

from ...core.artifacts import ArtifactKind, Loaded
from ..base import Method
from .model import Translator, TranslatorConfig, TranslatorManifest
from .repair import Options, repair_modules
from .train import PairDataset, build_dataset, train_and_save, train_translator


def _load_artifact(folder: str) -> Loaded:
    model, manifest = Translator.load(folder)
    return Loaded(model, manifest.content_hash, manifest.reference_hash or None)


#: The trained translator artifact (its manifest records the alignment reference it was trained with).
TRANSLATOR = ArtifactKind(
    name="translator",
    path_field="translator_path",
    load=_load_artifact,
    what="a translator artifact",
    how="`vllm-safeguard translator train`",
)

METHOD = Method("translator", Options, repair_modules, artifacts=(TRANSLATOR,))

__all__ = [
    "METHOD",
    "TRANSLATOR",
    "Options",
    "PairDataset",
    "Translator",
    "TranslatorConfig",
    "TranslatorManifest",
    "build_dataset",
    "repair_modules",
    "train_and_save",
    "train_translator",
]
