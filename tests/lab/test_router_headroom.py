"""Routing headroom (benchmarks/safety_lab/router_headroom.py): out-of-fold outputs and mixing losses."""

from __future__ import annotations

import pytest
import torch

from benchmarks.safety_lab.router_headroom import mixing_headroom, out_of_fold_outputs, subset
from tests.translator.test_translator import _unsafe_variant
from vllm_safeguard.methods.translator import TranslatorConfig, build_dataset, train_translator
from vllm_safeguard.methods.translator.train import PairDataset
from vllm_safeguard.testing.tiny import random_adapter

CFG = TranslatorConfig(k=4, hidden=16, router_hidden=8, seed=0)


@pytest.fixture(scope="module")
def data(tiny_reference, tiny_spec) -> PairDataset:
    pairs = []
    for i in range(3):
        safe = random_adapter(tiny_spec, rank=3, seed=200 + i, scale=0.05)
        pairs.append((_unsafe_variant(safe, tiny_reference, 0.7, seed=i), safe))
    return build_dataset(pairs, k=4)


def _synthetic(n_slots: int = 2, per_slot: int = 3, k: int = 2) -> tuple[PairDataset, torch.Tensor]:
    """Slot 0's targets are expert 0's outputs, slot 1's expert 1's: the oracle mixes (0, 1), loss 0."""
    m = n_slots * per_slot
    group = torch.arange(n_slots).repeat_interleave(per_slot)
    outputs = torch.stack([torch.full((m, k), 0.2), torch.full((m, k), 1.4)])
    g_star = torch.where(group[:, None] == 0, outputs[0], outputs[1])
    ones = torch.ones(m, k)
    data = PairDataset(torch.zeros(m, 3), ones / k, ones, g_star, group, group.clone())
    return data, outputs


def test_oracle_finds_each_slots_expert_and_constant_cannot():
    data, outputs = _synthetic()
    res = mixing_headroom(data, outputs, risk_weight=0.0, grid=11)
    assert res["oracle"]["loss"] == pytest.approx(0.0, abs=1e-9)
    assert res["oracle"]["w_expert1_mean"] == pytest.approx(0.5)
    assert res["constant"]["w_expert1"] == pytest.approx(0.5)
    assert res["constant"]["loss"] > 0.1
    assert res["headroom"] == pytest.approx(1.0)


def test_risk_weight_moves_the_constant_toward_the_expert_that_removes_more():
    data, outputs = _synthetic()
    low = mixing_headroom(data, outputs, risk_weight=0.0)["constant"]["w_expert1"]
    high = mixing_headroom(data, outputs, risk_weight=10.0)["constant"]["w_expert1"]
    assert high > low


def test_out_of_fold_outputs_never_see_the_pairs_own_targets(data):
    """Changing one pair's shrink targets changes every pair's outputs but its own."""
    base = out_of_fold_outputs(data, CFG, expert_steps=30, lr=1e-2)
    assert base.shape == (2, len(data), CFG.k) and base.isfinite().all()
    held = data.pair == 0
    moved = subset(data, torch.ones(len(data), dtype=torch.bool))
    moved.g_star = torch.where(held[:, None], (data.g_star + 0.5).clamp(max=2.0), data.g_star)
    other = out_of_fold_outputs(moved, CFG, expert_steps=30, lr=1e-2)
    assert torch.equal(other[:, held], base[:, held])
    assert not torch.equal(other[:, ~held], base[:, ~held])


def test_learned_router_is_scored_on_the_same_outputs(data):
    model, _ = train_translator(data, CFG, expert_steps=30, router_steps=30, lr=1e-2, progress=False)
    outputs = out_of_fold_outputs(data, CFG, expert_steps=30, lr=1e-2)
    res = mixing_headroom(data, outputs, risk_weight=1.0, router=model)
    assert res["oracle"]["loss"] <= res["constant"]["loss"] + 1e-9
    # the oracle's grid (step 0.01) can miss a slot's exact minimum by a hair, hence the tolerance
    assert res["learned"]["loss"] >= res["oracle"]["loss"] * (1 - 1e-3)
    assert 0.0 <= res["learned"]["w_expert1_mean"] <= 1.0


def test_shapes_and_pair_counts_are_checked(data):
    with pytest.raises(ValueError, match=r"\[2, M, k\]"):
        mixing_headroom(data, torch.zeros(3, len(data), CFG.k), 1.0)
    with pytest.raises(ValueError, match="need >= 2 pairs"):
        out_of_fold_outputs(subset(data, data.pair == 0), CFG, expert_steps=1)
