"""Kernel tests run the Triton kernels in the interpreter on CPU unless a CUDA GPU is present.

``TRITON_INTERPRET`` must be set before the kernels are decorated (``triton.jit`` picks the
interpreter at decoration time), hence here at conftest import time. On a GPU machine it stays
unset, so the same parametrized suite runs compiled on the GPU; force either mode with
``TRITON_INTERPRET=0/1``.

(No ``__init__.py`` in this folder on purpose: with one, pytest's default import mode would import
this folder as a top-level package named ``kernels`` and shadow the real ``kernels`` package.)
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# If some earlier test module already imported the kernels compiled-mode, re-decorate them for the
# interpreter (reload re-executes the module in the same namespace, so existing references to the
# launchers pick up the interpreted kernels too).
for _kernel in ("shrink", "expand"):
    _mod = sys.modules.get(f"kernels.triton_ops.fused_safety_lora_{_kernel}")
    if _mod is not None and os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(getattr(_mod, f"_fused_{_kernel}_kernel"), InterpretedFunction):
            importlib.reload(_mod)
