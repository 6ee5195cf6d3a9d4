"""Safety punica wrappers: vLLM's punica wrapper of each platform plus the per-token safety delta.

``punica_base.py`` states the semantics (the alpha buffer and layer table every wrapper carries),
``punica_cpu.py`` / ``punica_gpu.py`` subclass vLLM's wrapper of each platform, and ``selector.py``
picks one (as vLLM's own ``punica_wrapper/`` does).
"""
