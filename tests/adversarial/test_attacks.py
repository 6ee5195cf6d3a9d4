"""Every hostile adapter of the corpus is refused with its exact problem, naming the offending file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.errors import AdapterValidationError
from vllm_safeguard.testing import attacks
from vllm_safeguard.testing.attacks import ATTACKS, FOLDER, Attack

# Attacks whose refusal needs the base model's shapes (the rest are refused without them).
NEEDS_BASE = {"wrong_shape_for_base", "module_does_not_exist", "zero_modules_matched", "other_base_model"}

# One attack at least per item of issue 8's list.
REQUIRED = {
    "header_length_huge",  # oversized header
    "header_not_json",  # malformed header
    "offsets_overlap",
    "offsets_out_of_range",
    "header_duplicate_tensor_key",
    "nan_values",
    "inf_values_fp16",
    "wrong_shape_for_base",
    "rank_over_limit",
    "rank_pattern_regex",
    "rank_pattern_over_limit",
    "zero_modules_matched",
    "module_does_not_exist",
    "dtype_not_allowed",
    "empty_tensors",
    "pickle_only",
    "config_not_json",
    "config_huge_string",
    "config_auto_mapping",
    "weights_symlink_absolute",
    "config_symlink_dotdot",
    "key_path_traversal",
    "other_base_model",
    "zip_bomb_shape",
}


def _assert_names_file(err: AdapterValidationError, attack: Attack, folder: Path) -> None:
    assert err.file is not None, f"{attack.name}: error names no file: {err}"
    assert err.file in str(err)
    if attack.culprit == FOLDER:
        assert os.path.realpath(err.file) == os.path.realpath(folder), str(err)
    else:
        assert Path(err.file).name == attack.culprit, f"{attack.name}: expected {attack.culprit}: {err}"
        assert os.path.realpath(Path(err.file).parent) == os.path.realpath(folder), str(err)


def test_corpus_is_complete() -> None:
    names = [a.name for a in ATTACKS]
    assert len(names) >= 25
    assert len(set(names)) == len(names), "attack names must be unique"
    assert set(names) >= REQUIRED, REQUIRED - set(names)
    assert set(names) >= NEEDS_BASE
    for a in ATTACKS:
        assert a.expected and a.description, a.name


def test_good_adapter_passes(tmp_path: Path, adv_base_shapes: dict[str, tuple[int, int]]) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    attacks.write_good(folder, adv_base_shapes)
    adapter = load_adapter(folder, base_shapes=adv_base_shapes)
    assert set(adapter.modules) == set(attacks.target_modules(adv_base_shapes))
    for m in adapter.modules.values():
        assert m.rank == attacks.RANK
        assert (m.out_features, m.in_features) == adv_base_shapes[m.name]
        assert m.scaling == pytest.approx(attacks.ALPHA / attacks.RANK)
        assert torch.isfinite(m.lora_a).all() and torch.isfinite(m.lora_b).all()


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(
    attack: Attack, tmp_path: Path, adv_base_model: Path, adv_base_shapes: dict[str, tuple[int, int]]
) -> None:
    folder = attack.build(tmp_path / attack.name, adv_base_model)
    with pytest.raises(AdapterValidationError) as info:
        load_adapter(folder, base_shapes=adv_base_shapes)
    err = info.value
    assert attack.expected in str(err), f"{attack.name}: expected {attack.expected!r} in: {err}"
    assert attack.expected in err.problem
    _assert_names_file(err, attack, folder)


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.name not in NEEDS_BASE], ids=lambda a: a.name)
def test_attack_is_refused_without_base_shapes(
    attack: Attack, tmp_path: Path, adv_base_shapes: dict[str, tuple[int, int]]
) -> None:
    folder = attack.build_for_shapes(tmp_path / attack.name, adv_base_shapes)
    with pytest.raises(AdapterValidationError) as info:
        load_adapter(folder)
    assert attack.expected in str(info.value)


@pytest.mark.parametrize("name", sorted(NEEDS_BASE))
def test_base_dependent_attacks_load_without_base_shapes(
    name: str, tmp_path: Path, adv_base_shapes: dict[str, tuple[int, int]]
) -> None:
    """These adapters are well-formed: only the base model's shapes can refuse them."""
    attack = next(a for a in ATTACKS if a.name == name)
    load_adapter(attack.build_for_shapes(tmp_path / name, adv_base_shapes))


def test_pickle_is_never_unpickled(
    tmp_path: Path, adv_base_shapes: dict[str, tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    attack = next(a for a in ATTACKS if a.name == "pickle_only")
    folder = attack.build_for_shapes(tmp_path / "p", adv_base_shapes)
    with pytest.raises(AdapterValidationError):
        load_adapter(folder, base_shapes=adv_base_shapes)
    assert "canary" not in capsys.readouterr().out


def test_corpus_main_writes_everything(tmp_path: Path, adv_base_model: Path) -> None:
    out = tmp_path / "corpus"
    assert attacks.main([str(out), "--base-model", str(adv_base_model)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["attacks"]] == [a.name for a in ATTACKS]
    for entry in manifest["attacks"]:
        assert os.path.isdir(entry["path"]), entry["name"]
    assert len(manifest["path_attacks"]) == len(attacks.PATH_ATTACKS)
    assert os.path.islink(os.path.join(manifest["adapter_root"], "link_to_etc"))
    load_adapter(manifest["good"])
