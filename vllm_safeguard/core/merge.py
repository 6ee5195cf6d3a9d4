"""An adapter's update added to an HF model's weights in place, for the time of a ``with`` block.

Semantics::

    with merged_into(model, adapter):   # W <- W + B A (scale folded) for every adapter module
        ...                              # generate / read hidden states of the adapted model
    # W restored exactly (the originals are copied, not subtracted back)

Used where the served model is measured as an adapter would change it: the alpha calibration
(SafeGene's delta at each alpha) and the guard's training states under harmful adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .adapter import LoRAAdapter


@contextmanager
def merged_into(model: Any, adapter: LoRAAdapter) -> Iterator[None]:
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, mod in adapter.modules.items():
                w = params.get(f"{name}.weight")
                if w is None:
                    raise ValueError(f"adapter module {name!r} has no weight in the model")
                saved[f"{name}.weight"] = w.detach().clone()
                w.add_(mod.delta().to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)
