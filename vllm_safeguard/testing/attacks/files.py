"""Attacks on the adapter folder (pickles, symlinks, missing files) and hostile request paths."""

from __future__ import annotations

import os
from pathlib import Path

from ...core.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .parts import FOLDER, PathAttack, Shapes, attack, good_config, good_tensors, write_config, write_tensors

# A pickle that would print a canary if anything ever unpickled it (harmless by design).
PICKLE_CANARY = b"cbuiltins\nprint\n(S'vllm-safeguard canary: a pickle adapter was unpickled'\ntR."


@attack("only a pickle checkpoint was found", "adapter_model.bin")
def pickle_only(folder: Path, shapes: Shapes) -> None:
    """Only adapter_model.bin (a pickle, which runs code when loaded), no safetensors."""
    write_config(folder, good_config(shapes))
    (folder / "adapter_model.bin").write_bytes(PICKLE_CANARY)


@attack("escapes the adapter folder")
def weights_symlink_absolute(folder: Path, shapes: Shapes) -> None:
    """adapter_model.safetensors is a symlink to /etc/passwd."""
    write_config(folder, good_config(shapes))
    os.symlink("/etc/passwd", folder / WEIGHTS_NAME)


@attack("escapes the adapter folder", CONFIG_NAME)
def config_symlink_dotdot(folder: Path, shapes: Shapes) -> None:
    """adapter_config.json is a relative symlink climbing out with ../ segments."""
    os.symlink("../" * 16 + "etc/hostname", folder / CONFIG_NAME)
    write_tensors(folder, good_tensors(shapes))


@attack("not a regular file")
def weights_is_directory(folder: Path, shapes: Shapes) -> None:
    """adapter_model.safetensors is a directory."""
    write_config(folder, good_config(shapes))
    (folder / WEIGHTS_NAME).mkdir()


@attack("missing adapter_model.safetensors", FOLDER)
def weights_missing(folder: Path, shapes: Shapes) -> None:
    """No weights file at all (config only)."""
    write_config(folder, good_config(shapes))


@attack("missing adapter_config.json", FOLDER)
def config_missing(folder: Path, shapes: Shapes) -> None:
    """No adapter_config.json (weights only)."""
    write_tensors(folder, good_tensors(shapes))


# --------------------------------------------------------------------------- request path attacks

PATH_ATTACKS: list[PathAttack] = [
    PathAttack("dotdot_escape", "../../../../../../etc", "escapes the allowed adapter roots"),
    PathAttack("nested_dotdot_escape", "good/../../outside", "escapes the allowed adapter roots"),
    PathAttack("absolute_outside", "/etc", "escapes the allowed adapter roots"),
    PathAttack("absolute_dotdot", "{root}/good/../../..", "escapes the allowed adapter roots"),
    PathAttack("sibling_prefix", "{root}_evil/adapter", "escapes the allowed adapter roots"),
    PathAttack("symlink_out_of_root", "link_to_etc", "escapes the allowed adapter roots", "/etc"),
    PathAttack("root_itself", ".", "names an adapter root itself"),
    PathAttack("empty", "", "adapter path is empty"),
    PathAttack("nul_byte", "good\x00/../../etc", "NUL byte"),
    PathAttack("overlong", "a/" * 3000, "longer than"),
]
