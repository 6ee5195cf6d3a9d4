"""Activation statistics on safety samples, in each reference module's input basis (for ``nlsr``).

NLSR's official code scores safety-critical weights from the inputs each LoRA linear sees at the
*response* tokens of safety samples (prompt followed by a safe answer; prompt tokens masked). Every
quantity its low-rank step needs is a function of the input second moment ``X^T X`` seen through the
reference's factors, so per reference module ``m`` (``V ~= U S Vh``) only the ``k x k`` matrix::

    G_m = Vh_m (X_m^T X_m / n) Vh_m^T          # X_m: [n response tokens, in_features] inputs of module m

is kept: ``k <= max_rank`` floats squared per module, whatever the model width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ReferenceArtifactError


def _sample_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: the chat prompt then the response's tokens (as the official code: the
    response is appended to the templated prompt and only its positions are scored)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(p_ids) + list(r_ids), len(p_ids)


@torch.no_grad()
def safety_input_grams(
    model_dir: str | os.PathLike[str],
    vh: dict[str, torch.Tensor],
    samples: Sequence[tuple[str, str]],
    *,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """``({module: G_m [k, k]}, response tokens seen)`` for every module named in ``vh`` (its ``Vh``).

    Runs the model (transformers, fp32, CPU) once per sample with a forward pre-hook on each module.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not samples:
        raise ReferenceArtifactError("safety samples: need at least one (prompt, response) pair")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    grams = {name: torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64) for name, v in vh.items()}
    state: dict[str, Any] = {"mask": None}
    handles = []

    def hook(name: str):
        basis = vh[name].double()

        def pre(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0][0][state["mask"]].double()  # [response tokens, in]
            z = x @ basis.T  # [tokens, k]
            grams[name] += z.T @ z

        return pre

    try:
        for name in vh:
            try:
                handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
            except AttributeError as e:
                raise ReferenceArtifactError(f"{model_dir}: no module {name!r} to record inputs of") from e
        tokens = 0
        for prompt, response in tqdm(samples, desc="safety activations", disable=not progress):
            ids, n_prompt = _sample_ids(tok, prompt, response)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[n_prompt:] = True
            if not mask.any():
                continue
            state["mask"] = mask
            model(torch.tensor([ids]))
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ReferenceArtifactError("safety samples: every response is empty after tokenization")
    return {name: (g / tokens).float() for name, g in grams.items()}, tokens
