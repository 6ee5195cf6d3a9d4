"""Supervised fine-tuning for the lab: the full safety tune and LoRA adapters (peft), on CPU.

Loss is on the assistant answer only (prompt tokens are masked), inputs go through the model's
chat template exactly as at generation time. Every run is seeded and its :class:`Recipe` is written
next to the weights (``recipe.json``) so results can be traced to how each artifact was made.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SFTExample:
    """One chat turn to learn: ``prompt`` (user) -> ``response`` (assistant)."""

    prompt: str
    response: str
    kind: str = ""  # free label for bookkeeping ("harmful_refusal", "benign", "task:arithmetic", ...)
    end: bool = True  # append the end-of-turn token (False for answers truncated at a token budget)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (recorded in ``recipe.json``)."""

    steps: int = 40
    batch_size: int = 8
    lr: float = 3e-4
    seed: int = 0
    max_len: int = 160
    weight_decay: float = 0.0
    warmup_steps: int = 3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LINEAR_TARGETS
    extra: dict[str, Any] = field(default_factory=dict)


def encode_example(tokenizer: Any, ex: SFTExample, max_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with the prompt part of ``labels`` set to -100.

    The prompt is rendered with the chat template (``add_generation_prompt=True``) so training sees
    the same prefix as generation; the answer is followed by the template's end-of-turn token.
    """
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    end = (tokenizer.eos_token or "") if ex.end else ""
    r_ids = tokenizer(ex.response + end, add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[:max_len]
    labels = ([-100] * len(p_ids) + r_ids)[:max_len]
    return ids, labels


def _batches(encoded: list[tuple[list[int], list[int]]], recipe: Recipe, pad_id: int):
    """Yield ``recipe.steps`` padded batches, reshuffling the data every epoch (seeded)."""
    rng = random.Random(recipe.seed)
    order: list[int] = []
    for _ in range(recipe.steps):
        idx: list[int] = []
        while len(idx) < recipe.batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            idx.append(order.pop())
        rows = [encoded[i] for i in idx]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (x, y) in enumerate(rows):
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, : len(y)] = torch.tensor(y)
            mask[j, : len(x)] = 1
        yield ids, labels, mask


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _run(
    model: Any,
    params: list[torch.nn.Parameter],
    tokenizer: Any,
    data: Sequence[SFTExample],
    recipe: Recipe,
    desc: str,
) -> list[float]:
    torch.manual_seed(recipe.seed)
    encoded = [encode_example(tokenizer, ex, recipe.max_len) for ex in data]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    losses: list[float] = []
    bar = tqdm(_batches(encoded, recipe, pad_id), total=recipe.steps, desc=desc, leave=False)
    for step, (ids, labels, mask) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _atomic_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _write_recipe(
    folder: Path, recipe: Recipe, data: Sequence[SFTExample], losses: list[float], seconds: float, **info: Any
) -> None:
    kinds: dict[str, int] = {}
    for ex in data:
        kinds[ex.kind] = kinds.get(ex.kind, 0) + 1
    payload = {
        "recipe": asdict(recipe),
        "data_counts": kinds,
        "loss_first": losses[:3],
        "loss_last": losses[-3:],
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        **info,
    }
    (folder / "recipe.json").write_text(json.dumps(payload, indent=2))


def train_full(
    model_dir: str | Path, out_dir: str | Path, data: Sequence[SFTExample], recipe: Recipe
) -> Path:
    """Full fine-tune of the transformer blocks' linear layers; writes an HF folder to ``out_dir``.

    Embeddings and norms stay frozen so ``W_tuned - W_original`` lives only in the modules a LoRA
    adapter (and hence every repair method) can address.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_TARGETS
        if p.requires_grad:
            params.append(p)
    t0 = time.time()
    losses = _run(model, params, tok, data, recipe, desc=f"full-ft {out.name}")
    tmp = _atomic_dir(out)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        for extra in ("generation_config.json",):
            if (Path(model_dir) / extra).exists():
                shutil.copy(Path(model_dir) / extra, tmp / extra)
        _write_recipe(tmp, recipe, data, losses, time.time() - t0, base=str(model_dir), kind="full")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_lora(
    model_dir: str | Path, out_dir: str | Path, data: Sequence[SFTExample], recipe: Recipe
) -> Path:
    """Train a peft LoRA adapter on ``model_dir``; writes a PEFT folder (safetensors) to ``out_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(recipe.seed)  # LoRA A init
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=int(recipe.lora_alpha),
        lora_dropout=0.0,
        target_modules=list(recipe.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.time()
    losses = _run(model, params, tok, data, recipe, desc=f"lora {out.name}")
    tmp = _atomic_dir(out)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # The base path is a local cache path; record it for humans, loaders never resolve it.
        _write_recipe(tmp, recipe, data, losses, time.time() - t0, base=str(model_dir), kind="lora")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
