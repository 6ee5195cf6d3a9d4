"""Guard probe variants considered for issue 21, chosen by held-out-register recall only.

    python -m benchmarks.safety_lab.guard_variants [--results-dir DIR]

Semantics::

    model, pools = the generalization lab's aligned model and guard pools (cached lab stages)
    features     = per prompt and layer: the last prompt token's state, and the mean over the prompt's
                   tokens (one forward pass each)
    variant      = (pooling, layers, weight decay): a logistic probe on those features
    selection    = out-of-fold recall at 5% benign FPR (plain, vocabulary-sharing and wrapped benign
                   prompts pooled) over held-out-register folds (train_guard_grouped's rule); the test sets (a), (b), (c) and the benign test sets are scored only to report,
                   never to choose
    multi-layer  = the probe on the concatenation of the 3 layers with the best single-layer oof recall

Serving reads one layer's last prompt token (a mean needs every prefill chunk of a request; a
concatenation needs several hooks): a variant would have to earn that cost on the oof criterion.
Writes ``benchmarks/results/variants/guard_variants.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.safety_lab import run as R
from benchmarks.safety_lab.cache import file_hash, key_of, log, stage_dir
from benchmarks.safety_lab.config import GENERALIZATION as CFG
from benchmarks.safety_lab.extras import _guard_extra_tests, guard_sets
from vllm_safeguard.guard.probe import auroc
from vllm_safeguard.guard.train import _fit_logistic, _kind_threshold, _threshold, benign_kind, register_folds

RESULTS = Path(__file__).resolve().parents[1] / "results" / "variants"


@torch.no_grad()
def features(model: Any, tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last, mean)``, each ``[n, n_layers - 1, hidden]`` (the last layer's HF state is post-norm)."""
    last, mean = [], []
    for p in tqdm(prompts, desc="features"):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        hs = model(**ids, output_hidden_states=True).hidden_states[1:-1]
        last.append(torch.stack([h[0, -1] for h in hs]))
        mean.append(torch.stack([h[0].mean(0) for h in hs]))
    return torch.stack(last).float(), torch.stack(mean).float()


def oof_scores(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, n_folds: int, wd: float) -> torch.Tensor:
    out = torch.empty(len(y))
    for f in range(n_folds):
        tr, te = fold != f, fold == f
        w, b, mu, sd = _fit_logistic(x[tr], y[tr].float(), weight_decay=wd, steps=100, seed=0)
        out[te] = torch.sigmoid(((x[te] - mu) / sd) @ w + b)
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    base = R.base_model_dir()
    data = R.build_data(CFG)
    aligned = R.stage_aligned(CFG, base, data, R.stage_base_outputs(CFG, base, data)["benign_answers"])
    sets = guard_sets(CFG, data)
    tests = {
        "harm_a": sets["harm_test"],
        **_guard_extra_tests(sets, data),
        "benign_plain": sets["benign_test"],
    }
    model = AutoModelForCausalLM.from_pretrained(str(aligned), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(aligned))
    train_prompts = sets["harm_train"] + sets["benign_train"]
    y = torch.tensor([1] * len(sets["harm_train"]) + [0] * len(sets["benign_train"]))
    groups = sets["harm_train_groups"] + sets["benign_train_groups"]
    neg_kinds = [benign_kind(g) for g, v in zip(groups, y.tolist(), strict=True) if v == 0]
    cache = stage_dir("guard-variants", key_of("guard-variants", file_hash(aligned), train_prompts, tests))
    if (cache / "features.pt").is_file():
        f_train, f_test = torch.load(cache / "features.pt")
    else:
        f_train = features(model, tok, train_prompts)
        f_test = {k: features(model, tok, list(v)) for k, v in tests.items()}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save((f_train, f_test), cache / "features.pt")
    log(f"guard variants: features in {time.time() - t0:.0f}s")
    fold, both = register_folds(y, groups)
    n_layers = f_train[0].shape[1]
    rows: list[dict[str, Any]] = []

    def evaluate(
        name: str, pool: int, layers: list[int], wd: float, per_kind: bool = False
    ) -> dict[str, Any]:
        x = f_train[pool][:, layers].flatten(1)
        oof = oof_scores(x, y, fold, len(both), wd)
        if per_kind:  # 5% in EACH benign kind: the highest per-kind threshold (not adopted)
            thr = max(
                _threshold(oof[y == 1], oof[y == 0][torch.tensor([k == kind for k in neg_kinds])], 0.05)
                for kind in ("plain", "vocabulary", "wrapped")
            )
        else:  # 5% of the hard benign prompts pooled over kinds (train_guard_grouped's rule)
            thr = _kind_threshold(oof[y == 1], oof[y == 0], neg_kinds, 0.05)
        w, b, mu, sd = _fit_logistic(x, y.float(), weight_decay=wd, steps=100, seed=0)
        row: dict[str, Any] = {
            "variant": name,
            "pooling": ("last", "mean")[pool],
            "layers": layers,
            "weight_decay": wd,
            "threshold": "per kind" if per_kind else "pooled",
            "oof_recall_at_5pct": float((oof[y == 1] >= thr).float().mean()),
            "oof_auroc": auroc(oof[y == 1], oof[y == 0]),
        }
        for k, (fl, fm) in f_test.items():
            s = torch.sigmoid(((((fl, fm)[pool])[:, layers].flatten(1) - mu) / sd) @ w + b)
            row[f"{'recall' if k.startswith('harm') else 'fpr'}_{k}"] = float((s >= thr).float().mean())
        return row

    single: list[dict[str, Any]] = []
    for pool in (0, 1):
        for layer in tqdm(range(n_layers), desc=f"single layers ({('last', 'mean')[pool]})"):
            single.append(evaluate(f"{('last', 'mean')[pool]}-L{layer}", pool, [layer], 1e-2))
    rows += single
    best_last = max(
        (r for r in single if r["pooling"] == "last"), key=lambda r: (r["oof_recall_at_5pct"], r["oof_auroc"])
    )
    for wd in (1e-1, 1.0):
        rows.append(evaluate(f"last-L{best_last['layers'][0]}-wd{wd:g}", 0, best_last["layers"], wd))
    per_kind = [evaluate(f"last-L{k}-fpr-per-kind", 0, [k], 1e-2, per_kind=True) for k in range(n_layers)]
    rows.append(max(per_kind, key=lambda r: (r["oof_recall_at_5pct"], r["oof_auroc"])))
    for pool in (0, 1):
        ranked = sorted(
            (r for r in single if r["pooling"] == ("last", "mean")[pool]),
            key=lambda r: (r["oof_recall_at_5pct"], r["oof_auroc"]),
            reverse=True,
        )
        top3 = sorted(r["layers"][0] for r in ranked[:3])
        rows.append(evaluate(f"{('last', 'mean')[pool]}-concat{top3}", pool, top3, 1e-2))
    chosen = max(rows, key=lambda r: (r["oof_recall_at_5pct"], r["oof_auroc"]))
    out = {"folds": both, "n_train": len(y), "rows": rows, "best_by_oof": chosen, "seconds": time.time() - t0}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "guard_variants.json").write_text(json.dumps(out, indent=1))
    keys = [k for k in rows[0] if k.startswith(("recall_", "fpr_"))]
    md = [
        "# Guard variants (issue 21), chosen by out-of-fold recall on held-out registers",
        "",
        "Generalization lab's aligned model and guard pools; threshold at 5% out-of-fold FPR over the benign "
        "prompts of every kind pooled (plain, vocabulary-sharing, wrapped; `-fpr-per-kind`: 5% in each kind, "
        "not adopted). Test "
        "columns are reported, never used to choose. Single layers: the best 5 by oof recall per pooling.",
        "",
        "| variant | oof recall | oof AUROC | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    shown = [r for r in rows if r not in single]
    for pooling in ("last", "mean"):
        ranked = sorted(
            (r for r in single if r["pooling"] == pooling), key=lambda r: -r["oof_recall_at_5pct"]
        )
        shown = ranked[:5] + shown
    for r in shown:
        md.append(
            f"| {r['variant']} | {r['oof_recall_at_5pct']:.3f} | {r['oof_auroc']:.3f} | "
            + " | ".join(f"{100 * r[k]:.1f}%" for k in keys)
            + " |"
        )
    md += [
        "",
        f"Best by the oof criterion: **{chosen['variant']}**. Shipped: the best single-layer last-token "
        "probe (what the serving op reads: a mean needs every prefill chunk of a request, a concatenation "
        f"several hooks). Run time {out['seconds']:.0f} s (features cached after the first run).",
    ]
    (args.results_dir / "guard_variants.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
