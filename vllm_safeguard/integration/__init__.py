"""Everything that touches vLLM: the only package of vllm-safeguard that imports vLLM.

=====================  ===========================================================================
module                 job
=====================  ===========================================================================
plugin                 the ``vllm.general_plugins`` entry point: install the patches (idempotent)
patching               the patch mechanism (registry, contract check, deferred application)
monkey_patch           every patch, each a thin wrapper handing over to one module below
worker_state           per-worker state attached to vLLM's LoRA manager; the served model's name
worker_hook            admission in the worker: vLLM only ever reads the canonical copy
api_server             front-end checks: path containment, refusal -> 400, lost admitted copies
punica_wrapper/        vLLM's punica wrapper per platform + the per-token safety delta, bound layers
safety_op              the op every bound LoRA layer calls (static layer id; why ops, not Python)
layer_table            the safety weights of each LoRA layer, coverage-checked, TP-sharded
alpha_runner           bind the safety weights, stage and write per-token alpha on both runners
alpha_validator        ``vllm.logits_processors`` entry point: 400 for a bad ``safeguard_alpha``
guard_runner           the DSA guard probe as an op in the forward pass ("auto" mode)
guard_http             middleware returning guard scores as response headers
offline_engine         vLLM's offline ``LLM`` as a generator for the evaluation harness
=====================  ===========================================================================

Nothing here is imported eagerly: each process loads only what vLLM's hooks reach.
"""
