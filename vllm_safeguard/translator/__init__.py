"""NeWTral: a learned translator from unsafe to safe LoRA adapters (mixture of experts)."""

from .model import Translator, TranslatorConfig, TranslatorManifest
from .train import PairDataset, build_dataset, train_and_save, train_translator

__all__ = [
    "PairDataset",
    "Translator",
    "TranslatorConfig",
    "TranslatorManifest",
    "build_dataset",
    "train_and_save",
    "train_translator",
]
