"""Training the guard probe: hidden states of harmful vs benign prompts, layer chosen by validation AUROC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .probe import GuardManifest, GuardProbe, auroc


@torch.no_grad()
def last_token_states(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, progress: bool = True
) -> torch.Tensor:
    """``[n_prompts, n_layers, hidden]``: residual stream after every decoder layer, last prompt token.

    Prompts go through the chat template with the generation prompt, exactly as served.
    """
    out = []
    for p in tqdm(prompts, desc="guard: hidden states", disable=not progress):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        hs = model(**ids, output_hidden_states=True).hidden_states  # (embeddings, layer0, ..., layerN-1)
        # The last entry has the final norm applied in HF Llama; all others are raw residual streams.
        out.append(torch.stack([h[0, -1].float() for h in hs[1:]]))
    return torch.stack(out)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, weight_decay: float, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + weight_decay * (w**2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _threshold(pos: torch.Tensor, neg: torch.Tensor, target_fpr: float) -> float:
    """Threshold with validation FPR <= ``target_fpr``, centred in the gap above the allowed negatives.

    Semantics:
        lo = the highest benign score that must stay below the threshold (FPR budget spent above it)
        hi = the lowest harmful score above lo (lo if none)
        threshold = sigmoid((logit(lo) + logit(hi)) / 2)     # midpoint of the gap, in logit space
    Putting it just above ``lo`` (the old choice) flagged 20% of benign prompts from unseen topics on
    the lab model although validation separated perfectly (bench_guard).
    """
    neg_sorted = neg.sort(descending=True).values
    allowed = int(target_fpr * neg_sorted.numel())
    if allowed >= neg_sorted.numel():
        return 0.0
    lo = neg_sorted[allowed]
    above = pos[pos > lo]
    if above.numel() == 0:
        return float(lo) + 1e-6
    mid = (torch.logit(lo, eps=1e-7) + torch.logit(above.min(), eps=1e-7)) / 2
    return float(torch.sigmoid(mid))


def train_guard(
    train_states: torch.Tensor,
    train_labels: torch.Tensor,
    val_states: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    target_fpr: float = 0.05,
    weight_decay: float = 1e-2,
    steps: int = 200,
    seed: int = 0,
    alpha_low: float = 0.0,
    alpha_high: float = 1.0,
    model_fingerprint: str | None = None,
) -> GuardProbe:
    """Fit one logistic probe per candidate layer; keep the layer with the best validation AUROC.

    ``*_states``: ``[n, n_layers, hidden]``; labels 1 = harmful. The threshold is the smallest score
    whose validation false-positive rate on benign prompts is <= ``target_fpr``.
    """
    n_layers = train_states.shape[1]
    # The last layer's HF hidden state is post-norm (see last_token_states): not what a serving hook sees.
    candidates = list(layers) if layers is not None else list(range(n_layers - 1))
    y = train_labels.float()
    best: tuple[float, float, int, Any] | None = None
    per_layer: dict[int, float] = {}
    for layer in candidates:
        w, b, mean, std = _fit_logistic(
            train_states[:, layer], y, weight_decay=weight_decay, steps=steps, seed=seed
        )
        s = torch.sigmoid(((val_states[:, layer] - mean) / std) @ w + b)
        auc = auroc(s[val_labels == 1], s[val_labels == 0])
        per_layer[layer] = auc
        # Ties in AUROC (common when validation separates perfectly) go to the wider logit margin
        # between the lowest harmful and the highest benign score: it generalises better to new topics.
        margin = float(
            torch.logit(s[val_labels == 1].min(), eps=1e-7) - torch.logit(s[val_labels == 0].max(), eps=1e-7)
        )
        if best is None or (auc, margin) > (best[0], best[1]):
            best = (auc, margin, layer, (w, b, mean, std, s))
    assert best is not None
    auc, _, layer, (w, b, mean, std, s) = best
    threshold = _threshold(s[val_labels == 1], s[val_labels == 0], target_fpr)
    fpr = float((s[val_labels == 0] >= threshold).float().mean())
    tpr = float((s[val_labels == 1] >= threshold).float().mean())
    manifest = GuardManifest(
        layer=layer,
        hidden_size=int(w.numel()),
        threshold=threshold,
        alpha_low=alpha_low,
        alpha_high=alpha_high,
        model_fingerprint=model_fingerprint,
        metrics={"val_auroc": auc, "val_fpr": fpr, "val_tpr": tpr},
        layer_auroc=per_layer,
        training={
            "weight_decay": weight_decay,
            "steps": steps,
            "seed": seed,
            "target_fpr": target_fpr,
            "n_train": int(train_labels.numel()),
            "n_val": int(val_labels.numel()),
        },
    )
    return GuardProbe(w, b, mean, std, manifest)
