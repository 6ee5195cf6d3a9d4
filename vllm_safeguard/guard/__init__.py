"""DSA guard: a hidden-state safety probe that picks the alignment strength per request."""

from .probe import GUARD, GuardManifest, GuardProbe, auroc
from .train import last_token_states, train_guard

__all__ = ["GUARD", "GuardManifest", "GuardProbe", "auroc", "last_token_states", "train_guard"]
