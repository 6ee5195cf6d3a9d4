"""Attacks on the tensors: their values, dtypes and sizes, their names, and shapes that do not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.adapter import module_kind
from ...core.adapter_io import peft_key
from .parts import (
    RANK,
    Shapes,
    attack,
    first_module,
    good_config,
    good_tensors,
    tensor_attack,
    write_config,
    write_tensors,
)

Tensors = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------- tensor values


@tensor_attack("non-finite values")
def nan_values(tensors: Tensors, shapes: Shapes) -> None:
    """lora_A holds a NaN."""
    tensors[first_module(shapes)[1]][0, 0] = float("nan")


@tensor_attack("non-finite values", dtype=torch.float16)
def inf_values_fp16(tensors: Tensors, shapes: Shapes) -> None:
    """An fp16 adapter whose lora_B holds +Inf."""
    tensors[first_module(shapes)[2]][-1, -1] = float("inf")


@tensor_attack("overflows", lora_alpha=1e12)
def scaled_update_overflow(tensors: Tensors, shapes: Shapes) -> None:
    """Finite factors (B = 1e30) with lora_alpha = 1e12: scaling * B @ A is Inf."""
    tensors[first_module(shapes)[2]].fill_(1e30)


@tensor_attack("tensors mix dtypes", dtype=torch.float16)
def mixed_dtypes(tensors: Tensors, shapes: Shapes) -> None:
    """lora_A in fp32, the rest in fp16."""
    _, ka, _ = first_module(shapes)
    tensors[ka] = tensors[ka].float()


@tensor_attack("empty tensor")
def empty_tensors(tensors: Tensors, shapes: Shapes) -> None:
    """lora_A is [0, in] and lora_B is [out, 0] (zero-size tensors)."""
    _, ka, kb = first_module(shapes)
    tensors[ka] = torch.zeros(0, tensors[ka].shape[1])
    tensors[kb] = torch.zeros(tensors[kb].shape[0], 0)


# ------------------------------------------------------------------------------ names and shapes


@tensor_attack("key is not a LoRA weight name")
def smuggled_full_weight(tensors: Tensors, shapes: Shapes) -> None:
    """A full embed_tokens.weight smuggled next to the LoRA factors (bypasses the LoRA repair)."""
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(8, 8)


@tensor_attack("key is not a LoRA weight name")
def key_path_traversal(tensors: Tensors, shapes: Shapes) -> None:
    """A tensor name holding ../ path segments."""
    tensors["base_model.model.../../../../etc/passwd.lora_A.weight"] = tensors.pop(first_module(shapes)[1])


@tensor_attack("key is not a LoRA weight name")
def key_empty_components(tensors: Tensors, shapes: Shapes) -> None:
    """A tensor name with empty '..' module-path components."""
    m, ka, kb = first_module(shapes)
    bad = "." + m.replace(".", "..")
    tensors[peft_key(bad, "A")] = tensors.pop(ka)
    tensors[peft_key(bad, "B")] = tensors.pop(kb)


@tensor_attack("key is not a LoRA weight name")
def key_trailing_newline(tensors: Tensors, shapes: Shapes) -> None:
    """A tensor name ending in a newline (regex '$' would accept it)."""
    _, ka, _ = first_module(shapes)
    tensors[ka + "\n"] = tensors.pop(ka)


@tensor_attack("lora_B missing for module")
def missing_lora_b(tensors: Tensors, shapes: Shapes) -> None:
    """A module with lora_A but no lora_B."""
    del tensors[first_module(shapes)[2]]


@tensor_attack("LoRA factors must be 2-D")
def factor_3d(tensors: Tensors, shapes: Shapes) -> None:
    """lora_A is 3-D [r, in, 1]."""
    _, ka, _ = first_module(shapes)
    tensors[ka] = tensors[ka].unsqueeze(-1).contiguous()


@attack("lora_A must have shape [r=4")
def tensors_rank_mismatch(folder: Path, shapes: Shapes) -> None:
    """Config says r=4, tensors have rank 8."""
    write_config(folder, good_config(shapes))
    write_tensors(folder, good_tensors(shapes, rank=2 * RANK))


@tensor_attack("shapes do not fit the base module")
def wrong_shape_for_base(tensors: Tensors, shapes: Shapes) -> None:
    """lora_A's in_features is one more than the base module's."""
    _, ka, _ = first_module(shapes)
    tensors[ka] = torch.zeros(RANK, tensors[ka].shape[1] + 1)


@tensor_attack("module does not exist in the base model")
def module_does_not_exist(tensors: Tensors, shapes: Shapes) -> None:
    """An extra module in block 999, which the base model does not have."""
    m, ka, kb = first_module(shapes)
    ghost = f"model.layers.999.{module_kind(m)}"
    tensors[peft_key(ghost, "A")] = tensors[ka].clone()
    tensors[peft_key(ghost, "B")] = tensors[kb].clone()


@attack("module does not exist in the base model")
def zero_modules_matched(folder: Path, shapes: Shapes) -> None:
    """A GPT-2-style adapter (transformer.h.N.attn.c_attn): none of its modules is in the base model."""
    write_config(folder, good_config(shapes, target_modules=["c_attn"]))
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(2):
        m = f"transformer.h.{i}.attn.c_attn"
        tensors[peft_key(m, "A")] = torch.randn(RANK, 64, generator=g) * 0.05
        tensors[peft_key(m, "B")] = torch.randn(192, RANK, generator=g) * 0.05
    write_tensors(folder, tensors)


@attack("shapes do not fit the base module")
def other_base_model(folder: Path, shapes: Shapes) -> None:
    """Same module names, but every shape is from a model twice as wide (adapter for another base)."""
    write_config(folder, good_config(shapes, base_model_name_or_path="some-org/wider-model-7b"))
    write_tensors(folder, good_tensors({m: (2 * o, 2 * i) for m, (o, i) in shapes.items()}))
