"""The attack registry, the good adapter every attack mutates, and the file writers attacks use.

An attack is a ``writer(folder, base_shapes)`` registered with :func:`attack`. Most attacks change one
thing of the good adapter; the decorators below write the good rest, so that an attack states only its
change: :func:`entry_attack` (one tensor entry of the safetensors header), :func:`header_attack` (the
whole header, no data), :func:`tensor_attack` (the tensors) and :func:`config_attack` (the config).
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ...core.adapter import layer_index, module_kind
from ...core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, peft_key
from ...core.model_files import module_shapes_from_model_dir
from ..corpus import description

Shapes = Mapping[str, tuple[int, int]]
Writer = Callable[[Path, Shapes], None]
Header = Mapping[str, Any] | str | bytes  # a safetensors header: parsed, or its raw text / bytes
Config = Mapping[str, Any] | str | bytes  # an adapter_config.json: parsed, or its raw text / bytes

RANK = 4
ALPHA = 8
FOLDER = ""  # culprit value meaning "the error names the adapter folder itself"


@dataclass(frozen=True)
class Attack:
    """One hostile adapter.

    Attributes:
        name: identifier (the writer function's name).
        expected: substring the refusal message must contain.
        culprit: name of the file the error must point at (``adapter_config.json``,
            ``adapter_model.safetensors``, ...), or ``""`` for the adapter folder itself.
        description: the bad input, in words.
        writer: ``writer(folder, base_shapes)`` writes the files into an existing empty folder.
    """

    name: str
    expected: str
    culprit: str
    description: str
    writer: Writer

    def build(self, folder: str | os.PathLike[str], base_model_dir: str | os.PathLike[str]) -> Path:
        """Write this attack into ``folder`` (created; must not exist) for the model in ``base_model_dir``."""
        return self.build_for_shapes(folder, module_shapes_from_model_dir(base_model_dir))

    def build_for_shapes(self, folder: str | os.PathLike[str], base_shapes: Shapes) -> Path:
        out = Path(folder)
        out.mkdir(parents=True)
        self.writer(out, base_shapes)
        return out


@dataclass(frozen=True)
class PathAttack:
    """A hostile ``lora_path`` from a request, relative to (or escaping) an adapter root.

    ``{root}`` in ``request_path`` stands for the resolved adapter root. When ``symlink_target`` is
    set, ``root/<name>`` must first be made a symlink to it (``write_corpus`` does this).
    """

    name: str
    request_path: str
    expected: str
    symlink_target: str | None = None

    def resolve(self, root: str | os.PathLike[str]) -> str:
        return self.request_path.replace("{root}", os.path.realpath(os.fspath(root)))


ATTACKS: list[Attack] = []


def attack(expected: str, culprit: str = WEIGHTS_NAME) -> Callable[[Writer], Writer]:
    """Register the decorated writer as an attack (its docstring's first line is the description)."""

    def deco(fn: Writer) -> Writer:
        ATTACKS.append(Attack(fn.__name__, expected, culprit, description(fn), fn))
        return fn

    return deco


# ------------------------------------------------------------------------------------ good parts


def target_modules(shapes: Shapes) -> list[str]:
    """q_proj / v_proj of the first two blocks (any model: else the first 4 non-embedding linears)."""
    picked = [
        m for m in sorted(shapes) if module_kind(m) in ("q_proj", "v_proj") and layer_index(m) in (0, 1)
    ]
    if not picked:
        picked = [m for m in sorted(shapes) if "embed" not in m and "lm_head" not in m][:4]
    if not picked:
        raise ValueError("base model has no linear module to adapt")
    return picked


def good_tensors(
    shapes: Shapes, *, rank: int = RANK, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Valid ``lora_A [r, in]`` / ``lora_B [out, r]`` for every :func:`target_modules` module."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in target_modules(shapes):
        out_f, in_f = shapes[m]
        out[peft_key(m, "A")] = (torch.randn(rank, in_f, generator=g) * 0.05).to(dtype)
        out[peft_key(m, "B")] = (torch.randn(out_f, rank, generator=g) * 0.05).to(dtype)
    return out


def good_config(shapes: Shapes, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({module_kind(m) for m in target_modules(shapes)}),
        "base_model_name_or_path": None,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(folder: Path, cfg: Config) -> None:
    if isinstance(cfg, Mapping):
        cfg = json.dumps(cfg, indent=1)
    (folder / CONFIG_NAME).write_bytes(cfg.encode() if isinstance(cfg, str) else cfg)


def split_safetensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], bytes]:
    """``(header, data)`` of a safetensors file holding ``tensors`` (header keeps file order)."""
    blob = st_save(dict(tensors), metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_weights(
    folder: Path,
    header: Header,
    data: bytes = b"",
    *,
    length: int | None = None,
    name: str = WEIGHTS_NAME,
) -> None:
    """Write ``length (u64 LE) + header + data``; ``length`` defaults to the true header length."""
    if isinstance(header, Mapping):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if length is None else length
    (folder / name).write_bytes(struct.pack("<Q", n) + raw + data)


def write_tensors(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    header, data = split_safetensors(tensors)
    write_weights(folder, header, data)


def write_good(folder: Path, shapes: Shapes) -> None:
    """A valid adapter: the control every attack is a small mutation of."""
    write_config(folder, good_config(shapes))
    write_tensors(folder, good_tensors(shapes))


def first_module(shapes: Shapes) -> tuple[str, str, str]:
    """(module, lora_A key, lora_B key) of the first adapted module."""
    m = target_modules(shapes)[0]
    return m, peft_key(m, "A"), peft_key(m, "B")


def good_parts(shapes: Shapes) -> tuple[dict[str, Any], bytes]:
    """``(header, data)`` of the good adapter's weights file."""
    return split_safetensors(good_tensors(shapes))


def last_in_data(header: Mapping[str, Any]) -> str:
    """The tensor stored last in the data section."""
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ------------------------------------------------------------------- attacks on one part of it


def entry_attack(
    expected: str, *, last: bool = False
) -> Callable[[Callable[[dict[str, Any]], None]], Writer]:
    """Register ``fn(entry)``, which edits one tensor entry of the good header in place: the first
    module's lora_A (``last``: the tensor stored last in the data section). Config and data stay good."""

    def deco(fn: Callable[[dict[str, Any]], None]) -> Writer:
        @functools.wraps(fn)
        def write(folder: Path, shapes: Shapes) -> None:
            write_config(folder, good_config(shapes))
            header, data = good_parts(shapes)
            fn(header[last_in_data(header) if last else first_module(shapes)[1]])
            write_weights(folder, header, data)

        return attack(expected)(write)

    return deco


def header_attack(expected: str) -> Callable[[Callable[[Shapes], Header]], Writer]:
    """Register ``fn(shapes) -> header``: the weights file is that header alone (no data section),
    behind its true length; the config is good."""

    def deco(fn: Callable[[Shapes], Header]) -> Writer:
        @functools.wraps(fn)
        def write(folder: Path, shapes: Shapes) -> None:
            write_config(folder, good_config(shapes))
            write_weights(folder, fn(shapes))

        return attack(expected)(write)

    return deco


def tensor_attack(
    expected: str, *, dtype: torch.dtype = torch.float32, **config: Any
) -> Callable[[Callable[[dict[str, torch.Tensor], Shapes], None]], Writer]:
    """Register ``fn(tensors, shapes)``, which edits the good tensors (in ``dtype``) in place; the
    config is the good one with ``config`` overrides."""

    def deco(fn: Callable[[dict[str, torch.Tensor], Shapes], None]) -> Writer:
        @functools.wraps(fn)
        def write(folder: Path, shapes: Shapes) -> None:
            write_config(folder, good_config(shapes, **config))
            tensors = good_tensors(shapes, dtype=dtype)
            fn(tensors, shapes)
            write_tensors(folder, tensors)

        return attack(expected)(write)

    return deco


def config_attack(
    expected: str, culprit: str = CONFIG_NAME
) -> Callable[[Callable[[Shapes], Config]], Writer]:
    """Register ``fn(shapes) -> config``: that config next to the good tensors."""

    def deco(fn: Callable[[Shapes], Config]) -> Writer:
        @functools.wraps(fn)
        def write(folder: Path, shapes: Shapes) -> None:
            write_config(folder, fn(shapes))
            write_tensors(folder, good_tensors(shapes))

        return attack(expected, culprit)(write)

    return deco
