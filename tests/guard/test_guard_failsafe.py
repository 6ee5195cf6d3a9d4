"""Issue 21's guard: the fail-safe score -> alpha ramp (probe, op, runtime agree) and the selection
on held-out registers."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.torch_ops.guard_score import register_guard_score_op
from vllm_safeguard.alpha import AlphaTable
from vllm_safeguard.guard import GuardManifest, GuardProbe
from vllm_safeguard.guard.train import train_guard_grouped
from vllm_safeguard.integration.guard_runner import GuardBuffers, GuardRuntime


def _probe(ramp_low: float | None, threshold: float = 0.6, lo: float = 0.0, hi: float = 1.5) -> GuardProbe:
    w = torch.zeros(4)
    w[0] = 1.0  # score = sigmoid(h0)
    m = GuardManifest(
        layer=0, hidden_size=4, threshold=threshold, ramp_low=ramp_low, alpha_low=lo, alpha_high=hi
    )
    return GuardProbe(w, torch.tensor(0.0), torch.zeros(4), torch.ones(4), m)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_ramp_is_linear_in_logit_between_ramp_low_and_threshold():
    p = _probe(ramp_low=0.2)
    assert p.alpha_for(0.05) == 0.0 and p.alpha_for(0.2) == 0.0
    assert p.alpha_for(0.6) == 1.5 and p.alpha_for(0.99) == 1.5
    mid = 1 / (1 + math.exp(-(_logit(0.2) + _logit(0.6)) / 2))
    assert p.alpha_for(mid) == pytest.approx(0.75, abs=1e-6)
    xs = [0.21, 0.3, 0.4, 0.5, 0.59]
    ys = [p.alpha_for(x) for x in xs]
    assert ys == sorted(ys) and 0.0 < ys[0] < ys[-1] < 1.5  # monotone, strictly inside the band


def test_no_ramp_is_the_two_level_switch():
    for ramp in (None, 0.6, 0.9):  # None, or a ramp_low at/above the threshold: no band
        p = _probe(ramp_low=ramp)
        assert [p.alpha_for(s) for s in (0.1, 0.59, 0.6, 0.9)] == [0.0, 0.0, 1.5, 1.5]


@pytest.mark.parametrize("ramp_low", [None, 0.05, 0.3])
def test_op_writes_the_probes_alpha_for_every_score(ramp_low):
    """The in-graph op and GuardProbe.alpha_for (which the runtime reports) agree on every score."""
    register_guard_score_op()
    probe = _probe(ramp_low)
    n = 9
    rt = GuardRuntime(
        probe, GuardBuffers.make(probe, max_pending=n, token_alpha=torch.zeros(n)), AlphaTable()
    )
    rt.plan_step([f"r{i}" for i in range(n)], [1] * n, [0] * n, [1] * n, lambda i: (True, False))
    rt.apply(n)
    h = torch.zeros(n, 4)
    h[:, 0] = torch.linspace(-4, 4, n)
    rt.hook(torch.nn.Identity(), (), h)
    got = rt.buffers.token_alpha[:n].tolist()
    want = [probe.alpha_for(float(torch.sigmoid(v))) for v in h[:, 0]]
    assert got == pytest.approx(want, abs=1e-5)
    rt.collect()
    assert [rt.table.get(f"r{i}") for i in range(n)] == pytest.approx(want, abs=1e-5)


def test_manifest_roundtrips_ramp(tmp_path):
    p = _probe(ramp_low=0.25)
    p.save(tmp_path / "g")
    q = GuardProbe.load(tmp_path / "g")
    assert q.manifest.ramp_low == 0.25 and q.decision() == pytest.approx([0.6, 0.0, 1.5, 0.25])
    assert _probe(None).decision() == pytest.approx([0.6, 0.0, 1.5, 0.6])


def _grouped_data(seed: int = 0):
    """Layer 2 carries the harmful signal in every register; layer 1 only in 'plain' (a probe chosen
    on in-distribution data could pick either; held-out registers must pick layer 2)."""
    g = torch.Generator().manual_seed(seed)
    regs = ["plain", "question", "role_play", "fiction"]
    groups, labels = [], []
    for r in regs:
        for i in range(40):
            groups.append(r)
            labels.append(i % 2)
    groups += ["domain"] * 30 + ["vocabulary"] * 10
    labels += [0] * 40
    y = torch.tensor(labels)
    x = torch.randn(len(y), 4, 16, generator=g)
    x[:, 2, 0] += 2.5 * y
    plain = torch.tensor([gg == "plain" for gg in groups])
    x[:, 1, 1] += 6.0 * y * plain  # separable only where the wording is the training one
    x[:, 1, 2] += 3.0 * torch.tensor([gg != "plain" for gg in groups])  # register shift on layer 1
    return x, y, groups


def test_grouped_training_picks_the_layer_that_holds_on_unseen_registers():
    x, y, groups = _grouped_data()
    probe, rep = train_guard_grouped(
        x, y, groups, target_fpr=0.1, ramp_fpr=0.3, steps=50, max_layer_fraction=1.0
    )
    assert probe.layer == 2
    assert rep["per_layer"][2]["oof_recall"] > rep["per_layer"][1]["oof_recall"]
    assert set(rep["folds"]) == {"plain", "question", "role_play", "fiction"}
    m = probe.manifest
    assert m.ramp_low is not None and m.ramp_low <= m.threshold
    assert m.metrics["val_fpr"] <= 0.1 + 1e-6  # on out-of-fold benign prompts (domain tasks excluded)


def test_grouped_training_refuses_bad_input():
    x, y, groups = _grouped_data()
    with pytest.raises(ValueError, match="differ in length"):
        train_guard_grouped(x, y, groups[:-1])
    with pytest.raises(ValueError, match="at least 2 groups with both classes"):
        train_guard_grouped(x, y, ["plain"] * len(groups))


def test_default_candidates_are_the_first_half_of_the_stack():
    x, y, groups = _grouped_data()
    _, rep = train_guard_grouped(x, y, groups, target_fpr=0.1, steps=20)
    assert set(rep["per_layer"]) == {0, 1}  # 4 states (HF: the last is post-norm) -> layers 0-1
