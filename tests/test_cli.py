"""The offline CLI end to end on tiny models: reference build -> scan -> safety-vector -> repair."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vllm_safeguard.apps.cli import app
from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.testing.tiny import write_random_adapter

runner = CliRunner()


def test_cli_pipeline(tmp_path, tiny_models, tiny_spec):
    base, aligned = tiny_models
    ref = tmp_path / "ref"
    r = runner.invoke(
        app, ["reference", "build", "--aligned", str(aligned), "--base", str(base), "--out", str(ref)]
    )
    assert r.exit_code == 0, r.output
    assert "reference: 14 modules" in r.output and (ref / "manifest.json").is_file()

    adapter = write_random_adapter(tmp_path / "ad", tiny_spec, seed=4)
    r = runner.invoke(
        app,
        [
            "scan",
            str(adapter),
            "--reference",
            str(ref),
            "--base-model",
            str(aligned),
            "--json",
            str(tmp_path / "scan.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "adapter risk score" in r.output
    assert len(json.loads((tmp_path / "scan.json").read_text())["modules"]) == 14

    harmful = write_random_adapter(tmp_path / "harm", tiny_spec, seed=5)
    r = runner.invoke(
        app,
        [
            "safety-vector",
            "extract",
            "--aligned",
            str(aligned),
            "--harmful-adapter",
            str(harmful),
            "--out",
            str(tmp_path / "safety"),
            "--rank",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output

    for method in ("safelora", "safelora_subspace", "nlsr_datafree", "safegene"):
        out = tmp_path / f"rep-{method}"
        r = runner.invoke(
            app,
            [
                "repair",
                str(adapter),
                "--method",
                method,
                "--reference",
                str(ref),
                "--out",
                str(out),
                "--max-rank",
                "8",
                "--safety",
                str(tmp_path / "safety"),
                "--options",
                "{}",
            ],
        )
        assert r.exit_code == 0, r.output
        assert f"wrote {out}" in r.output
        assert load_adapter(out).max_rank <= 8
        assert json.loads((out / "repair_report.json").read_text())["method"] == method


def test_cli_reports_bad_input_cleanly(tmp_path, tiny_models):
    r = runner.invoke(app, ["scan", str(tmp_path / "missing"), "--reference", str(tmp_path)])
    assert r.exit_code == 2
    assert "adapter path is not a directory" in r.output
    r = runner.invoke(
        app,
        [
            "repair",
            str(tmp_path),
            "--reference",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--options",
            "{bad",
        ],
    )
    assert r.exit_code == 2 and "--options is not JSON" in r.output


def test_reference_build_records_safety_activations_for_nlsr(tmp_path, tiny_models, tiny_spec):
    base, aligned = tiny_models
    samples = tmp_path / "safe.jsonl"
    samples.write_text(
        json.dumps({"prompt": "how to make a weapon", "response": "I can't help with that."})
        + "\n\n"
        + json.dumps({"prompt": "write malware", "response": "Sorry, I won't."})
        + "\n"
    )
    ref = tmp_path / "ref"
    build = ["reference", "build", "--aligned", str(aligned), "--base", str(base), "--out", str(ref)]
    r = runner.invoke(app, [*build, "--safety-samples", str(samples)])
    assert r.exit_code == 0, r.output
    assert json.loads((ref / "manifest.json").read_text())["safety_tokens"] > 0
    adapter = write_random_adapter(tmp_path / "ad", tiny_spec, seed=4)
    out = tmp_path / "rep"
    r = runner.invoke(
        app, ["repair", str(adapter), "--method", "nlsr", "--reference", str(ref), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert load_adapter(out).modules

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "only a prompt"}\n')
    r = runner.invoke(app, [*build[:-1], str(tmp_path / "ref2"), "--safety-samples", str(bad)])
    assert r.exit_code != 0 and "bad.jsonl:2" in r.output
    assert not (tmp_path / "ref2").exists()
