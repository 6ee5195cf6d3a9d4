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


# Hashed into the cache keys of every stage that trains a guard (prepare, the lab): a change of the
# training rule rebuilds the probe. 4 = issue 21 (held-out-register selection, ramp, training states
# under harmful adapters too, candidate layers in the first half of the stack).
GUARD_RECIPE = 4


def benign_kind(group: str) -> str | None:
    """The benign kind a training group's FPR is held for: ``plain``, ``vocabulary`` or ``wrapped``
    (any register); None for domain tasks (easy negatives that would dilute the budget)."""
    if group == "domain":
        return None
    return group if group in ("plain", "vocabulary") else "wrapped"


def _kind_threshold(pos: torch.Tensor, neg: torch.Tensor, kinds: Sequence[str | None], fpr: float) -> float:
    """The threshold at ``fpr`` over the benign prompts of every kind pooled (domain tasks left out).

    Holding ``fpr`` in EACH kind instead (the highest per-kind threshold) was measured on the
    generalization lab's pools and not adopted: held-out-category recall 68% instead of 85% for a
    test FPR of 3.8 / 6.7% instead of 7.5 / 6.7% (wrapped / vocabulary-sharing benign prompts;
    benchmarks/results/variants/guard_variants.md)."""
    hard = torch.tensor([k is not None for k in kinds])
    return _threshold(pos, neg[hard], fpr)


def register_folds(labels: torch.Tensor, groups: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """``(fold of each prompt, fold names)``: one fold per group holding both classes (a register,
    "plain"); prompts of one-class groups (vocabulary-sharing benign, domain tasks) dealt round robin."""
    classes: dict[str, set[int]] = {}
    for v, g in zip(labels.tolist(), groups, strict=True):
        classes.setdefault(g, set()).add(int(v))
    both = sorted(g for g, c in classes.items() if c == {0, 1})
    fold, rr = torch.empty(len(groups), dtype=torch.long), 0
    for i, g in enumerate(groups):
        if g in both:
            fold[i] = both.index(g)
        else:
            fold[i], rr = rr % max(1, len(both)), rr + 1
    return fold, both


def train_guard_grouped(
    states: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    target_fpr: float = 0.05,
    ramp_fpr: float | None = 0.2,
    max_layer_fraction: float = 0.5,
    weight_decay: float = 1e-2,
    steps: int = 100,
    seed: int = 0,
    alpha_low: float = 0.0,
    alpha_high: float = 1.0,
    model_fingerprint: str | None = None,
) -> tuple[GuardProbe, dict[str, Any]]:
    """The guard chosen for prompts worded unlike its training data (issue 21).

    Semantics::

        folds   = the groups holding both classes (registers, "plain"); prompts of one-class groups
                  (vocabulary-sharing benign, domain tasks) are dealt round robin into the folds
        oof[i]  = score of prompt i by the probe fitted at that layer on every fold but i's
        layer   = argmax over layers of (recall of oof at benign FPR target_fpr, oof AUROC)
        probe   = fitted on every prompt at that layer
        hard    = benign prompts of every kind (plain, vocabulary-sharing, wrapped in a register);
                  domain tasks are easy negatives that would dilute the budget: left out
        threshold = the oof score above which target_fpr of the hard benign prompts lie
                    (_kind_threshold); the oof FPR of each kind is reported
        ramp_low  = the same at ramp_fpr: alpha rises from alpha_low there to alpha_high at the
                    threshold (GuardProbe.alpha_for); None = the two-level switch
        (the layer is chosen on the recall at that threshold)

    Validation on held-out registers, not in-distribution AUROC, picks the layer and the threshold:
    the lab's first guard (AUROC 1.0 in split) flagged 20 of 60 templated prompts.
    """
    if states.shape[0] != labels.numel() or labels.numel() != len(groups):
        raise ValueError(
            f"states ({states.shape[0]}), labels ({labels.numel()}) and groups ({len(groups)}) differ in length"
        )
    y = labels.float()
    fold, both = register_folds(labels, groups)
    if len(both) < 2:
        raise ValueError(f"need at least 2 groups with both classes for held-out folds, got {both!r}")
    neg_kinds = [benign_kind(g) for g, v in zip(groups, labels.tolist(), strict=True) if v == 0]
    n_layers = states.shape[1]
    # Serving scores the ADAPTED model: late layers, where a task adapter has moved the residual stream
    # most, did not transfer from the adapters the probe trained under to other adapters. The lab's
    # guard at layer 28 of 30 flagged 82% of the test prompts under the training adapters and almost
    # none under the evaluation experts (auto ASR 93-97%); the pre-issue-21 guard at layer 7 did flag
    # under them. Default candidates: the first half of the stack.
    top = max(1, int((n_layers + 1) * max_layer_fraction))
    candidates = list(layers) if layers is not None else list(range(min(top, n_layers - 1)))
    per_layer: dict[int, dict[str, float]] = {}
    best: tuple[float, float, int, torch.Tensor] | None = None
    for layer in tqdm(candidates, desc="guard: held-out-register folds"):
        x = states[:, layer].float()
        oof = torch.empty(len(groups))
        for f in range(len(both)):
            tr, te = fold != f, fold == f
            w, b, mean, std = _fit_logistic(x[tr], y[tr], weight_decay=weight_decay, steps=steps, seed=seed)
            oof[te] = torch.sigmoid(((x[te] - mean) / std) @ w + b)
        pos, neg = oof[labels == 1], oof[labels == 0]
        recall = float((pos >= _kind_threshold(pos, neg, neg_kinds, target_fpr)).float().mean())
        auc = auroc(pos, neg)
        per_layer[layer] = {"oof_recall": recall, "oof_auroc": auc}
        if best is None or (recall, auc) > (best[0], best[1]):
            best = (recall, auc, layer, oof)
    assert best is not None
    recall, auc, layer, oof = best
    w, b, mean, std = _fit_logistic(
        states[:, layer].float(), y, weight_decay=weight_decay, steps=steps, seed=seed
    )
    pos, neg = oof[labels == 1], oof[labels == 0]
    threshold = _kind_threshold(pos, neg, neg_kinds, target_fpr)
    ramp_low = None if ramp_fpr is None else min(_kind_threshold(pos, neg, neg_kinds, ramp_fpr), threshold)
    hard = torch.tensor([k is not None for k in neg_kinds])
    fpr_by_kind = {
        kind: float((neg[torch.tensor([k == kind for k in neg_kinds])] >= threshold).float().mean())
        for kind in sorted({k for k in neg_kinds if k is not None})
    }
    by_group = {
        g: float((oof[[gg == g for gg in groups]] >= threshold).float().mean()) for g in sorted(set(groups))
    }
    manifest = GuardManifest(
        layer=layer,
        hidden_size=int(w.numel()),
        threshold=threshold,
        ramp_low=ramp_low,
        alpha_low=alpha_low,
        alpha_high=alpha_high,
        model_fingerprint=model_fingerprint,
        metrics={
            "val_auroc": auc,
            "val_tpr": float((pos >= threshold).float().mean()),
            "val_fpr": float((neg[hard] >= threshold).float().mean()),
        },
        layer_auroc={k: v["oof_auroc"] for k, v in per_layer.items()},
        training={
            "selection": "held-out-register folds (oof recall at target FPR)",
            "folds": both,
            "weight_decay": weight_decay,
            "steps": steps,
            "seed": seed,
            "target_fpr": target_fpr,
            "ramp_fpr": ramp_fpr,
            "n_train": int(labels.numel()),
        },
    )
    report = {
        "per_layer": per_layer,
        "oof_flag_rate_by_group": by_group,
        "oof_fpr_by_kind": fpr_by_kind,
        "folds": both,
    }
    return GuardProbe(w, b, mean, std, manifest), report
