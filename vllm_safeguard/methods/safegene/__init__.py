"""SafeGene: a reusable low-rank safety adapter (``safety_adapter.py``: the artifact, its extraction,
layer selection and few-shot recalibration) added to task adapters at load time (``repair.py``)."""

from __future__ import annotations

from ..base import Method
from .repair import Options, repair_modules
from .safety_adapter import (
    SAFETY_ADAPTER,
    SafetyAdapter,
    SafetyManifest,
    extract_from_models,
    extract_safety_adapter,
    from_trained_lora,
    merge_safety_into_adapter,
    recalibrate,
    select_layers,
)

METHOD = Method("safegene", Options, repair_modules, artifacts=(SAFETY_ADAPTER,))

__all__ = [
    "METHOD",
    "SAFETY_ADAPTER",
    "Options",
    "SafetyAdapter",
    "SafetyManifest",
    "extract_from_models",
    "extract_safety_adapter",
    "from_trained_lora",
    "merge_safety_into_adapter",
    "recalibrate",
    "repair_modules",
    "select_layers",
]
