"""``vllm-safeguard prepare``: build, for one served model, every artifact the plugin uses.

Modules: :mod:`.options` (the numbers), :mod:`.inputs` (bundled or operator prompts, split),
:mod:`.plan` (stages, cache keys, estimate), :mod:`.stages` (builders, manifest), :mod:`.run` (runs a
plan), :mod:`.calibrate` (alpha_high), plus the shared training material the safety lab uses too:
:mod:`.data` (HarmBench, benign prompts, domain tasks), :mod:`.train` (SFT / LoRA training) and
:mod:`.model_source` (the pinned SmolLM2 and HarmBench wheels).
"""
