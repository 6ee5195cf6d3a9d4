"""Which generator runs an evaluation: vLLM's offline engine where vLLM is installed, else HF."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from .generation import Generator, HFGenerator


def make_generator(model_dir: str | os.PathLike[str], backend: str = "auto", **kw: Any) -> Generator:
    """``vllm`` | ``hf`` | ``auto`` (vLLM when importable, else HF)."""
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if backend == "vllm":
        from ..integration.offline_engine import VLLMGenerator

        return VLLMGenerator(model_dir, **kw)
    if backend == "hf":
        return HFGenerator(model_dir)
    raise ValueError(f"unknown backend {backend!r}")
