"""Root containment of request paths (``vllm_safeguard.admission.paths.contained_path``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_safeguard.admission.paths import contained_path
from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.errors import AdapterValidationError
from vllm_safeguard.testing.attacks import PATH_ATTACKS, PathAttack, write_good


@pytest.fixture()
def root(tmp_path: Path, adv_base_shapes: dict[str, tuple[int, int]]) -> Path:
    """``adapters/good`` (valid), ``adapters/inner_link -> good``, a sibling ``adapters_evil``."""
    r = tmp_path / "adapters"
    (r / "good").mkdir(parents=True)
    write_good(r / "good", adv_base_shapes)
    os.symlink(r / "good", r / "inner_link")
    (tmp_path / "adapters_evil" / "adapter").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return r


@pytest.mark.parametrize("attack", PATH_ATTACKS, ids=[a.name for a in PATH_ATTACKS])
def test_path_attack_is_refused(attack: PathAttack, root: Path) -> None:
    if attack.symlink_target is not None:
        os.symlink(attack.symlink_target, root / attack.request_path)
    with pytest.raises(AdapterValidationError) as info:
        contained_path(attack.resolve(root), [str(root)])
    assert attack.expected in str(info.value)


@pytest.mark.parametrize("request_path", ["good", "./good", "{root}/good", "good/../good", "inner_link"])
def test_paths_inside_the_root_are_accepted(request_path: str, root: Path) -> None:
    path = contained_path(request_path.replace("{root}", str(root)), [str(root)])
    assert path == Path(os.path.realpath(root / "good"))
    load_adapter(path)


def test_second_root_and_missing_names(tmp_path: Path, root: Path) -> None:
    other = tmp_path / "other_root"
    (other / "x").mkdir(parents=True)
    # a relative name is looked up in each root in turn; the first root where it exists wins
    assert contained_path("x", [str(root), str(other)]) == Path(os.path.realpath(other / "x"))
    assert contained_path(str(other / "x"), [str(root), str(other)]) == Path(os.path.realpath(other / "x"))
    # a missing name inside a root is contained (the loader then refuses it as "not a directory")
    missing = contained_path("nope", [str(root)])
    assert missing == Path(os.path.realpath(root / "nope"))
    with pytest.raises(AdapterValidationError, match="not a directory"):
        load_adapter(missing)


def test_relative_name_cannot_hop_between_roots(tmp_path: Path, root: Path) -> None:
    other = tmp_path / "other_root"
    (other / "x").mkdir(parents=True)
    with pytest.raises(AdapterValidationError, match="escapes"):
        contained_path("../other_root/x", [str(root)])


def test_symlinked_root_is_resolved(tmp_path: Path, root: Path) -> None:
    link_root = tmp_path / "root_link"
    os.symlink(root, link_root)
    assert contained_path("good", [str(link_root)]) == Path(os.path.realpath(root / "good"))
    assert contained_path(str(root / "good"), [str(link_root)]) == Path(os.path.realpath(root / "good"))


def test_no_roots_refuses_everything(root: Path) -> None:
    with pytest.raises(AdapterValidationError, match="no adapter roots"):
        contained_path(str(root / "good"), [])
