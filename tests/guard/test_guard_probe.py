"""Guard probe: AUROC maths, training on a tiny model's real hidden states, artifacts, alpha mapping."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_safeguard.errors import ReferenceArtifactError
from vllm_safeguard.guard import GuardProbe, auroc, last_token_states, train_guard

HARM_WORDS = ["bomb", "weapon", "hack", "steal"]
BENIGN_WORDS = ["cake", "poem", "story", "recipe"]


def _prompts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fill = ["how", "to", "make", "a", "the", "please", "explain", "write", "tell", "me"]
    return [" ".join(rng.sample(fill, 4) + [rng.choice(words)] + rng.sample(fill, 2)) for _ in range(n)]


def test_auroc_maths():
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5
    assert auroc(torch.tensor([0.3, 0.9]), torch.tensor([0.5, 0.1])) == 0.75
    with pytest.raises(ValueError):
        auroc(torch.tensor([]), torch.tensor([0.1]))


@pytest.fixture(scope="module")
def states(tiny_models):
    _, aligned = tiny_models
    model = AutoModelForCausalLM.from_pretrained(aligned).eval()
    tok = AutoTokenizer.from_pretrained(aligned)
    harm_tr, ben_tr = _prompts(HARM_WORDS, 24, 0), _prompts(BENIGN_WORDS, 24, 1)
    harm_va, ben_va = _prompts(HARM_WORDS, 12, 2), _prompts(BENIGN_WORDS, 12, 3)
    tr = last_token_states(model, tok, harm_tr + ben_tr, progress=False)
    va = last_token_states(model, tok, harm_va + ben_va, progress=False)
    ytr = torch.tensor([1] * 24 + [0] * 24)
    yva = torch.tensor([1] * 12 + [0] * 12)
    return tr, ytr, va, yva


def test_last_token_states_match_hidden_states(states, tiny_spec):
    tr, *_ = states
    assert tr.shape == (48, tiny_spec.num_hidden_layers, tiny_spec.hidden_size)


def test_train_guard_separates_and_roundtrips(tmp_path, states):
    tr, ytr, va, yva = states
    probe = train_guard(tr, ytr, va, yva, target_fpr=0.1, layers=[0])
    m = probe.manifest
    assert m.layer == 0 and set(m.layer_auroc) == {0}
    assert m.metrics["val_auroc"] > 0.9
    assert m.metrics["val_fpr"] <= 0.1 + 1e-9
    scores = probe.score(va[:, m.layer])
    assert ((scores >= m.threshold).float() == yva.float()).float().mean() > 0.8
    assert probe.alpha_for(1.0) == m.alpha_high and probe.alpha_for(0.0) == m.alpha_low
    out = probe.save(tmp_path / "guard")
    again = GuardProbe.load(out)
    assert torch.allclose(again.score(va[:, m.layer]), scores)
    (out / "guard.safetensors").write_bytes((out / "guard.safetensors").read_bytes()[:-1] + b"\x01")
    with pytest.raises(ReferenceArtifactError, match="sha256"):
        GuardProbe.load(out)


def test_shuffled_labels_do_not_generalise(states):
    """Sanity check that the AUROC above is learned, not an artefact: random labels give chance level."""
    tr, ytr, va, yva = states
    g = torch.Generator().manual_seed(0)
    probe = train_guard(tr, ytr[torch.randperm(len(ytr), generator=g)], va, yva, layers=[0])
    assert probe.manifest.metrics["val_auroc"] < 0.85


def test_cli_guard_train(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from vllm_safeguard.apps.cli import app

    (tmp_path / "harm.txt").write_text("\n".join(_prompts(HARM_WORDS, 20, 5)))
    (tmp_path / "ben.txt").write_text("\n".join(_prompts(BENIGN_WORDS, 20, 6)))
    r = CliRunner().invoke(
        app,
        [
            "guard",
            "train",
            "--model",
            str(tiny_models[1]),
            "--harmful",
            str(tmp_path / "harm.txt"),
            "--benign",
            str(tmp_path / "ben.txt"),
            "--out",
            str(tmp_path / "g"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "val AUROC" in r.output
    assert GuardProbe.load(tmp_path / "g").manifest.layer in (0,)  # tiny model: 2 layers, last excluded
