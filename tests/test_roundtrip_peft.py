"""A repaired adapter written to disk loads in peft and gives the outputs its weights predict."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from vllm_safeguard.core.adapter_io import load_adapter, save_adapter
from vllm_safeguard.core.model_files import module_shapes_from_model_dir
from vllm_safeguard.methods import repair
from vllm_safeguard.methods.safegene import extract_safety_adapter
from vllm_safeguard.testing.tiny import random_adapter


@pytest.mark.parametrize("method", ["safelora", "safelora_subspace", "nlsr_datafree", "safegene"])
def test_repaired_adapter_loads_in_peft(tmp_path, tiny_models, tiny_reference, tiny_spec, method):
    _, aligned = tiny_models
    adapter = random_adapter(tiny_spec, rank=4, alpha=8.0, seed=11, targets=("q_proj", "v_proj", "down_proj"))
    harmful = random_adapter(tiny_spec, rank=4, seed=12)
    safety = extract_safety_adapter(aligned, [harmful], rank=2, progress=False)
    options = {
        "safelora": {},
        "safelora_subspace": {"threshold": 0.9},
        "nlsr_datafree": {"mode": "topk", "top_k_layers": 1},
        "safegene": {},
    }[method]
    result = repair(
        adapter, tiny_reference, method, options, max_rank=8, artifacts={"safety_adapter": safety}
    )
    assert result.report.modules_touched > 0
    out = save_adapter(result.adapter, tmp_path / "repaired")

    # our own loader accepts what we wrote, and it round-trips the update exactly (fp32)
    again = load_adapter(out, base_shapes=module_shapes_from_model_dir(aligned))
    for name, mod in result.adapter.modules.items():
        assert torch.allclose(again.modules[name].delta(), mod.delta(), atol=1e-6)

    ids = torch.tensor([[1, 10, 20, 30, 40, 50, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(aligned).eval()
    sd = merged.state_dict()
    for name, mod in result.adapter.modules.items():
        sd[name + ".weight"] += mod.delta()
    merged.load_state_dict(sd)
    with torch.no_grad():
        got, want = peft_model(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(aligned).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really does something
