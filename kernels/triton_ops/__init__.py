"""Triton ops (torch + triton only), one op across a few modules named after it:

* ``fused_safety_lora.py``: :func:`fused_safety_lora` (one fused shrink + one fused expand) and the
  torch custom op ``torch.ops.safeguard.fused_safety_lora`` (:func:`register_fused_safety_lora_op`);
* ``fused_safety_lora_shrink.py`` / ``fused_safety_lora_expand.py``: the two kernels, their
  launchers and launch configs;
* ``fused_safety_lora_meta.py``: the sorted-by-adapter metadata and the helpers both launchers share.

The torch reference of each op is ``kernels/torch_ops/<op>.py``. Public names are re-exported by
``kernels`` (lazily); nothing is re-exported here, so ``kernels.triton_ops.fused_safety_lora`` is
always the module, never the function of the same name.
"""
