"""``vllm-safeguard`` command line: offline scan/repair, artifact builders, the server launcher."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError, SafeguardError

app = typer.Typer(
    help="Repair third-party LoRA adapters' safety alignment (offline tools + vLLM launcher).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
reference_app = typer.Typer(help="Alignment reference (safety subspace) artifacts.", no_args_is_help=True)
safety_app = typer.Typer(help="SafeGene safety-vector artifacts.", no_args_is_help=True)
app.add_typer(reference_app, name="reference")
translator_app = typer.Typer(help="NeWTral translator artifacts.", no_args_is_help=True)
app.add_typer(safety_app, name="safety-vector")
app.add_typer(translator_app, name="translator")
guard_app = typer.Typer(help="DSA guard probe artifacts.", no_args_is_help=True)
app.add_typer(guard_app, name="guard")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def _load(adapter_dir: Path, base_model: Path | None):
    from ..core.adapter_io import load_adapter
    from ..core.model_files import module_shapes_from_model_dir

    shapes = module_shapes_from_model_dir(base_model) if base_model else None
    return load_adapter(adapter_dir, base_shapes=shapes)


def _read_samples(path: Path) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from a JSONL file; a bad line is refused with its number."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((str(row["prompt"]), str(row["response"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f'{path}:{i}: expected {{"prompt": ..., "response": ...}}, got {line[:80]!r}'
            ) from e
    if not out:
        raise ConfigError(f"{path}: no safety samples")
    return out


@reference_app.command("build")
def reference_build(
    aligned: Path = typer.Option(..., help="HF folder of the aligned (served) model."),
    base: Path = typer.Option(..., help="HF folder of the unaligned/base counterpart."),
    out: Path = typer.Option(..., help="Output folder for reference.safetensors + manifest.json."),
    energy: float = typer.Option(
        0.9,
        help="Share of ||W_aligned - W_base||_F^2 each module keeps (1.0 with a max rank >= the model's "
        "widths keeps every direction: what the `safelora` method needs to be the paper's exact operator).",
    ),
    max_rank: int = typer.Option(64, help="Upper bound on the kept rank per module."),
    safety_samples: Path | None = typer.Option(
        None,
        help='JSONL of {"prompt": ..., "response": ...} safe answers: records each module\'s input '
        "statistics on the response tokens (the `nlsr` method needs them).",
    ),
) -> None:
    """Compute per-module V = W_aligned - W_base and store its energy-truncated SVD."""
    from ..core.reference import AlignmentReference

    try:
        samples = _read_samples(safety_samples) if safety_samples else None
        ref = AlignmentReference.build(aligned, base, energy=energy, max_rank=max_rank)
        if samples:
            ref.record_safety_activations(aligned, samples)
        ref.save(out)
    except SafeguardError as e:
        _fail(e)
    ranks = [m.rank for m in ref.manifest.modules.values()]
    kept = [m.energy_kept for m in ref.manifest.modules.values()]
    errors = [m.gram_error or 0.0 for m in ref.manifest.modules.values()]
    typer.echo(
        f"reference: {len(ranks)} modules, rank {min(ranks)}-{max(ranks)}, energy kept >= {min(kept):.3f}; "
        f"SafeLoRA operator V V^T/||V|| truncation error <= {max(errors):.3g}"
    )
    typer.echo(f"wrote {out} (sha256 {ref.manifest.content_hash[:16]}...)")


@app.command()
def scan(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter folder."),
    reference: Path = typer.Option(..., help="Reference folder from `reference build`."),
    base_model: Path | None = typer.Option(None, help="Base model folder to check module shapes against."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Validate an adapter and print its risk report (per module and overall)."""
    from ..core.reference import AlignmentReference
    from ..core.risk import score_adapter

    try:
        ad = _load(adapter, base_model)
        ref = AlignmentReference.load(reference)
    except SafeguardError as e:
        _fail(e)
    risk = score_adapter(ad, ref)
    rows = [(n, f"{r.risk:.4f}", f"{r.subspace_energy:.4f}") for n, r in sorted(risk.modules.items())]
    typer.echo(_table(rows, ("module", "risk", "subspace_energy")))
    typer.echo(
        f"\nadapter risk score: {risk.score:.4f}  ({len(risk.modules)} modules matched, "
        f"{len(risk.unmatched)} not covered by the reference)"
    )
    if json_out:
        data = {
            "adapter": str(adapter),
            "risk_score": risk.score,
            "unmatched": risk.unmatched,
            "modules": {n: vars(r) for n, r in risk.modules.items()},
        }
        json_out.write_text(json.dumps(data, indent=2))
        typer.echo(f"wrote {json_out}")


@app.command("repair")
def repair_cmd(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter folder."),
    method: str = typer.Option(
        "nlsr_datafree",
        help="A registered repair method (vllm_safeguard.methods.METHODS): safelora, safelora_subspace, nlsr, nlsr_datafree, safegene, translator.",
    ),
    reference: Path = typer.Option(..., help="Reference folder from `reference build`."),
    out: Path = typer.Option(..., help="Output folder for the repaired PEFT adapter."),
    options: str = typer.Option("{}", help="Method options as JSON, e.g. '{\"threshold\": 0.5}'."),
    max_rank: int | None = typer.Option(
        None, help="Rank bound of the repaired adapter (e.g. vLLM's max_lora_rank)."
    ),
    safety: Path | None = typer.Option(None, help="SafeGene safety adapter folder (method safegene)."),
    translator: Path | None = typer.Option(None, help="Translator artifact folder (method translator)."),
    base_model: Path | None = typer.Option(None, help="Base model folder to check module shapes against."),
) -> None:
    """Repair an adapter and write it as a PEFT folder (loadable by peft and vLLM) + repair_report.json."""
    from ..core.adapter_io import save_adapter
    from ..core.reference import AlignmentReference
    from ..methods import METHODS, repair

    # The folder given for each artifact kind a method may declare (vllm_safeguard.core.artifacts).
    given = {"safety_adapter": safety, "translator": translator}
    try:
        opts: Any = json.loads(options)
    except json.JSONDecodeError as e:
        _fail(ValueError(f"--options is not JSON: {e} (got {options!r})"))
    try:
        ad = _load(adapter, base_model)
        ref = AlignmentReference.load(reference)
        kinds = METHODS[method].artifacts if method in METHODS else ()
        artifacts = {k.name: k.load(str(given[k.name])).value for k in kinds if given.get(k.name) is not None}
        result = repair(ad, ref, method, opts, max_rank=max_rank, artifacts=artifacts)
        save_adapter(result.adapter, out)
    except SafeguardError as e:
        _fail(e)
    rep = result.report
    typer.echo(_table(rep.summary_rows(), ("module", "risk", "similarity", "action", "rank")))
    typer.echo(
        f"\n{method}: risk {rep.risk_score:.4f}; touched {rep.modules_touched}/{rep.modules_total} modules "
        f"in {rep.layers_repaired} layers; rank <= {rep.max_rank_out}; {rep.duration_s * 1000:.1f} ms"
    )
    for note in rep.notes:
        typer.echo(f"  note: {note}")
    (out / "repair_report.json").write_text(rep.model_dump_json(indent=2))
    typer.echo(f"wrote {out}")


@safety_app.command("extract")
def safety_extract(
    aligned: Path = typer.Option(..., help="HF folder of the aligned model."),
    out: Path = typer.Option(..., help="Output folder for the safety adapter."),
    harmful_adapter: list[Path] = typer.Option([], help="Harmful adapter(s); degraded = aligned + adapter."),
    degraded: Path | None = typer.Option(None, help="Or: a degraded model folder (dense difference)."),
    rank: int = typer.Option(8, help="Rank r_s of the safety adapter."),
    probes: Path | None = typer.Option(
        None, help="Probe prompts (one per line) for data-aware layer selection."
    ),
    keep: float = typer.Option(0.5, help="Share of layers kept by the selection."),
) -> None:
    """Extract the reusable SafeGene safety adapter (W_aligned - W_degraded, rank r_s)."""
    from ..methods.safegene import extract_from_models, extract_safety_adapter, select_layers

    if bool(harmful_adapter) == bool(degraded):
        _fail(ValueError("give either --harmful-adapter (one or more) or --degraded"))
    try:
        if degraded:
            safety = extract_from_models(aligned, degraded, rank=rank)
        else:
            safety = extract_safety_adapter(aligned, [_load(p, aligned) for p in harmful_adapter], rank=rank)
        if probes:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            prompts = [line.strip() for line in probes.read_text().splitlines() if line.strip()]
            model = AutoModelForCausalLM.from_pretrained(aligned).eval()
            safety = select_layers(model, AutoTokenizer.from_pretrained(aligned), safety, prompts, keep=keep)
        safety.save(out)
    except SafeguardError as e:
        _fail(e)
    typer.echo(f"safety adapter: rank {safety.manifest.rank}, layers {safety.manifest.layers}")
    typer.echo(f"wrote {out}")


@translator_app.command("train")
def translator_train(
    pairs: Path = typer.Option(
        ..., help='JSON file: [{"unsafe": DIR, "safe": DIR}, ...] (same domain and seed).'
    ),
    reference: Path = typer.Option(..., help="Reference folder from `reference build`."),
    out: Path = typer.Option(
        ..., help="Output folder (translator.safetensors + translator.json, checkpoints/)."
    ),
    k: int = typer.Option(16, help="Directions of the learned output basis per module the translator edits."),
    hidden: int = typer.Option(128, help="Expert MLP width."),
    expert_steps: int = typer.Option(400, help="Training steps per expert."),
    router_steps: int = typer.Option(200, help="Training steps of the router."),
    lr: float = typer.Option(3e-3, help="Adam learning rate."),
    risk_weight: float = typer.Option(1.0, help="Router penalty on risk left after translation."),
    cross_fit: bool = typer.Option(
        True,
        help="View each training pair in a basis fitted to the other pairs (as an unseen adapter is); "
        "needs >= 2 pairs.",
    ),
    seed: int = typer.Option(0, help="Initialisation seed (training is deterministic given it)."),
) -> None:
    """Train the translator (experts, then router) on unsafe->safe adapter pairs."""
    from ..core.reference import AlignmentReference
    from ..methods.translator import TranslatorConfig, train_and_save

    try:
        spec = json.loads(pairs.read_text())
        if not isinstance(spec, list) or not all(
            isinstance(p, dict) and {"unsafe", "safe"} <= set(p) for p in spec
        ):
            raise ValueError(f"{pairs}: expected a list of {{'unsafe': DIR, 'safe': DIR}} objects")
        ref = AlignmentReference.load(reference)
        loaded = [(_load(Path(p["unsafe"]), None), _load(Path(p["safe"]), None)) for p in spec]
        _, _, history = train_and_save(
            loaded,
            spec,
            ref,
            out,
            TranslatorConfig(k=k, hidden=hidden, seed=seed),
            expert_steps=expert_steps,
            router_steps=router_steps,
            lr=lr,
            risk_weight=risk_weight,
            cross_fit=cross_fit,
        )
    except (SafeguardError, ValueError, OSError) as e:
        _fail(e)
    for name, losses in history.items():
        typer.echo(f"{name}: loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    typer.echo(f"wrote {out}")


@guard_app.command("train")
def guard_train(
    model: Path = typer.Option(..., help="HF folder of the served model."),
    harmful: Path = typer.Option(..., help="Harmful prompts (one per line or JSON list)."),
    benign: Path = typer.Option(..., help="Benign prompts (one per line or JSON list)."),
    out: Path = typer.Option(..., help="Output folder (guard.safetensors + guard.json)."),
    val_fraction: float = typer.Option(
        0.3, help="Share of each class held out to choose the layer and threshold."
    ),
    target_fpr: float = typer.Option(
        0.05, help="Largest benign false-positive rate allowed at the threshold."
    ),
    layers: str = typer.Option("", help="Comma-separated candidate layers (default: all but the last)."),
    alpha_low: float = typer.Option(0.0, help="Alignment strength below the threshold."),
    alpha_high: float = typer.Option(1.0, help="Alignment strength at or above the threshold."),
    seed: int = typer.Option(0, help="Split and initialisation seed."),
) -> None:
    """Train the guard probe on the served model's hidden states; the layer is chosen by validation AUROC."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.model_files import model_fingerprint
    from ..guard import last_token_states, train_guard

    try:
        from ..prepare.inputs import read_prompts

        harm, ben = read_prompts(harmful, unique=False), read_prompts(benign, unique=False)
        rng = random.Random(seed)
        rng.shuffle(harm)
        rng.shuffle(ben)
        nh, nb = max(1, int(len(harm) * val_fraction)), max(1, int(len(ben) * val_fraction))
        if len(harm) - nh < 2 or len(ben) - nb < 2:
            raise ValueError(
                f"too few prompts ({len(harm)} harmful, {len(ben)} benign) for a train/val split"
            )
        hf = AutoModelForCausalLM.from_pretrained(model).eval()
        tok = AutoTokenizer.from_pretrained(model)
        tr = last_token_states(hf, tok, harm[nh:] + ben[nb:])
        va = last_token_states(hf, tok, harm[:nh] + ben[:nb])
        ytr = torch.tensor([1] * (len(harm) - nh) + [0] * (len(ben) - nb))
        yva = torch.tensor([1] * nh + [0] * nb)
        cand = [int(x) for x in layers.split(",") if x.strip()] or None
        probe = train_guard(
            tr,
            ytr,
            va,
            yva,
            layers=cand,
            target_fpr=target_fpr,
            seed=seed,
            alpha_low=alpha_low,
            alpha_high=alpha_high,
            model_fingerprint=model_fingerprint(model),
        )
        probe.save(out)
    except (SafeguardError, ValueError, OSError) as e:
        _fail(e)
    m = probe.manifest
    typer.echo(
        f"guard: layer {m.layer}, val AUROC {m.metrics['val_auroc']:.4f}, threshold {m.threshold:.4f} "
        f"(FPR {m.metrics['val_fpr']:.3f}, TPR {m.metrics['val_tpr']:.3f})"
    )
    typer.echo(f"wrote {out}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="HF folder of the served (aligned) model."),
    prompts: Path = typer.Option(
        ...,
        help='JSONL prompt file: {"type": "harmful"|"benign"|"task", "prompt": ..., "answer": ..., '
        '"domain": ...} per line (plain text: one harmful prompt per line).',
    ),
    adapter: Path | None = typer.Option(
        None, help="PEFT adapter folder to evaluate (default: the bare model)."
    ),
    reference_adapter: Path | None = typer.Option(
        None, help="Adapter to compare task accuracy against (fidelity), e.g. the unrepaired one."
    ),
    out: Path | None = typer.Option(None, help="Write every generation and metric to this JSON file."),
    judge: str = typer.Option("keyword", help="Refusal judge (default: keyword refusal-prefix list)."),
    backend: str = typer.Option("auto", help="'vllm' (offline engine), 'hf' (transformers), or 'auto'."),
    harmful_tokens: int = typer.Option(32, min=1, help="Greedy tokens generated per harmful prompt."),
    benign_tokens: int = typer.Option(32, min=1, help="Greedy tokens generated per benign prompt."),
    task_tokens: int = typer.Option(16, min=1, help="Greedy tokens generated per task prompt."),
) -> None:
    """ASR, benign over-refusal and task accuracy (Wilson 95% CIs) of an adapter: the safety lab's harness."""
    from ..evaluation.eval_cli import run_eval, summary_line

    try:
        res = run_eval(
            adapter,
            prompts,
            model,
            out,
            reference_adapter_dir=reference_adapter,
            judge=judge,
            backend=backend,
            harmful_tokens=harmful_tokens,
            benign_tokens=benign_tokens,
            task_tokens=task_tokens,
        )
    except (SafeguardError, ValueError, OSError) as e:
        _fail(e)
    typer.echo(summary_line(res))
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command()
def admit(
    adapter: Path = typer.Argument(..., help="PEFT LoRA adapter folder to admit."),
    model: Path = typer.Option(
        ..., help="Served (aligned) model folder; its artifacts are located as the server does."
    ),
    config: Path | None = typer.Option(None, help="Config file (YAML/TOML), as SAFEGUARD_CONFIG_FILE."),
    additional_config: str = typer.Option(
        "{}", help="JSON as given to vLLM's --additional-config (e.g. '{\"safeguard\": {...}}')."
    ),
    out: Path | None = typer.Option(None, help="Write the folder vLLM would be handed here."),
    max_lora_rank: int | None = typer.Option(None, help="vLLM's --max-lora-rank."),
    dtype: str = typer.Option(
        "auto", help="Served dtype (vLLM's --dtype): auto, float16, bfloat16, float32."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the decision as JSON."),
) -> None:
    """Dry run of the worker's admission: refused / repaired / passed, why, risk before and after.

    Exit code 0 when the adapter would be served, 3 when it would be refused, 2 on a usage error.
    """
    from ..admission.dry_run import dry_run

    try:
        extra = json.loads(additional_config)
        result = dry_run(
            adapter,
            model,
            out,
            config_file=config,
            additional_config=extra,
            max_lora_rank=max_lora_rank,
            dtype=dtype,
        )
    except (SafeguardError, ValueError, OSError) as e:
        _fail(e)
    if json_out:
        typer.echo(result.to_json())
    else:
        risk = "" if result.risk_before is None else f"; risk {result.risk_before:.3f}"
        if result.risk_after is not None:
            risk += f" -> {result.risk_after:.3f}"
        why = f" ({result.refusal}): {result.reason}" if result.reason else ""
        typer.echo(f"{result.decision}{why}{risk}")
        if result.out:
            typer.echo(f"wrote {result.out}")
    raise typer.Exit(3 if result.decision == "refused" else 0)


@app.command()
def prepare(
    model: Path = typer.Option(..., help="HF folder of the served (aligned) model."),
    base: Path | None = typer.Option(
        None,
        help="HF folder of its unaligned counterpart: needed for the alignment reference (load-time repair).",
    ),
    out: Path | None = typer.Option(
        None,
        help="Artifacts root (default: the plugin's artifacts_dir, <cache root>/artifacts unless configured).",
    ),
    name: str | None = typer.Option(
        None, help="Folder name under --out (default: the model folder's name, which the plugin looks up)."
    ),
    harmful: Path | None = typer.Option(
        None,
        help="Operator harmful prompts (one per line or a JSON list) instead of the bundled HarmBench set.",
    ),
    benign: Path | None = typer.Option(None, help="Operator benign prompts instead of the bundled set."),
    probe_adapter: list[Path] = typer.Option(
        [],
        help="Harmful adapter(s) of the operator's (e.g. ones already caught) to extract the safety adapter "
        "and calibrate alpha from, instead of training probe adapters (repeatable).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and time estimate; build nothing."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this model's earlier artifacts first."),
    options: Path | None = typer.Option(
        None, help="JSON file overriding PrepareOptions fields (vllm_safeguard/prepare/options.py)."
    ),
) -> None:
    """Build every artifact the plugin uses for one model (resumable; see `--dry-run`)."""
    from ..config import load_config
    from ..prepare.inputs import load_inputs
    from ..prepare.options import PrepareOptions
    from ..prepare.plan import make_plan
    from ..prepare.run import clean, run_plan

    try:
        opts = PrepareOptions(**(json.loads(options.read_text()) if options else {}))
        inputs = load_inputs(opts, harmful, benign)
        root = out or load_config().artifacts_dir
        if root is None:
            raise ConfigError("no --out and artifacts_dir is unset: say where the artifacts go")
        plan = make_plan(model, base, root, opts, inputs, name, probe_adapter)
        if fresh and not dry_run:
            clean(plan)
            plan = make_plan(model, base, root, opts, inputs, name, probe_adapter)
        typer.echo(plan.describe())
        if dry_run:
            return
        manifest = run_plan(plan, log=typer.echo)
    except (SafeguardError, ValueError, OSError) as e:
        _fail(e)
    q = manifest["quality"]
    if q["guard"]:
        h = q["guard"]["heldout"]
        typer.echo(
            f"guard: layer {q['guard']['layer']}, held-out AUROC {h['auroc_harmful_vs_benign_and_domain']:.3f}, "
            f"TPR {h['tpr_at_threshold']:.2f}, benign FPR {h['fpr_benign_at_threshold']:.2f}"
        )
    if q["alpha_calibration"]:
        c = q["alpha_calibration"]
        typer.echo(f"alpha_high {c['alpha_high']:g} (few-shot ASR by alpha {c['fewshot_asr_by_alpha']})")
    for kind, why in manifest["not_built"].items():
        typer.echo(f"not built: {kind}: {why}")
    typer.echo(f"wrote {plan.root / 'manifest.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Start vLLM's OpenAI server with the plugin active; all arguments go to vLLM."""
    from .serve import run

    raise typer.Exit(run(list(ctx.args)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="vllm-safeguard")


if __name__ == "__main__":
    main()
