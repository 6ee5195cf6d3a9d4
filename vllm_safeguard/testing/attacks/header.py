"""Attacks on the safetensors framing: the length prefix, the header JSON and its tensor entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...core.adapter_io import WEIGHTS_NAME
from .parts import (
    RANK,
    Header,
    Shapes,
    attack,
    entry_attack,
    first_module,
    good_config,
    good_parts,
    header_attack,
    write_config,
    write_weights,
)


@attack("header length over the")
def header_length_huge(folder: Path, shapes: Shapes) -> None:
    """Header length prefix claims 2**64 - 1 bytes (allocation bomb)."""
    write_config(folder, good_config(shapes))
    header, data = good_parts(shapes)
    write_weights(folder, header, data, length=2**64 - 1)


@attack("header length runs past the end of the file")
def header_length_past_eof(folder: Path, shapes: Shapes) -> None:
    """Header length prefix (1 MB) is within the limit but longer than the whole file."""
    write_config(folder, good_config(shapes))
    write_weights(folder, b"{}", length=1 << 20)


@attack("file too short")
def file_too_short(folder: Path, shapes: Shapes) -> None:
    """Weights file of 3 bytes: not even a length prefix."""
    write_config(folder, good_config(shapes))
    (folder / WEIGHTS_NAME).write_bytes(b"\x01\x02\x03")


@header_attack("header is not valid JSON")
def header_not_json(shapes: Shapes) -> Header:
    """Header bytes are not JSON (truncated object)."""
    return b'{"base_model.model.x.lora_A.weight": {"dtype": "F32", "sha'


@header_attack("header is not valid JSON")
def header_invalid_utf8(shapes: Shapes) -> Header:
    """Header holds invalid UTF-8 bytes."""
    return b'{"\xff\xfe\xfd": {}}'


@header_attack("header is not valid JSON")
def header_nan_constant(shapes: Shapes) -> Header:
    """Header uses the non-standard JSON constant NaN as a data offset."""
    entry = '{"dtype": "F32", "shape": [4, 4], "data_offsets": [NaN, 64]}'
    return "{" + json.dumps(first_module(shapes)[1]) + ": " + entry + "}"


@header_attack("header is not valid JSON")
def header_deeply_nested(shapes: Shapes) -> Header:
    """Header is 100k nested arrays (parser stack exhaustion)."""
    return "[" * 100_000 + "]" * 100_000


@header_attack("header must be a JSON object")
def header_not_object(shapes: Shapes) -> Header:
    """Header is a JSON array, not an object."""
    return "[1, 2, 3]"


@entry_attack("malformed tensor entry")
def header_entry_extra_field(entry: dict[str, Any]) -> None:
    """A tensor entry carries an unknown field next to dtype/shape/data_offsets."""
    entry["__reduce__"] = "os.system"


@attack("duplicate key in JSON object")
def header_duplicate_tensor_key(folder: Path, shapes: Shapes) -> None:
    """The same tensor name appears twice in the header (last-wins parsers disagree)."""
    write_config(folder, good_config(shapes))
    header, data = good_parts(shapes)
    _, ka, _ = first_module(shapes)
    text = json.dumps(header)
    dup = json.dumps({ka: header[ka]})[1:-1]
    write_weights(folder, "{" + dup + ", " + text[1:], data)


@entry_attack("dtype not allowed")
def dtype_not_allowed(entry: dict[str, Any]) -> None:
    """Tensors declared as I64 (integer tensors are not LoRA factors)."""
    entry["dtype"] = "I64"


@entry_attack("dtype not allowed")
def dtype_object(entry: dict[str, Any]) -> None:
    """dtype is a JSON object naming a class to import, not a dtype tag."""
    entry["dtype"] = {"__class__": "torch.float32", "module": "builtins"}


@entry_attack("malformed shape")
def shape_negative(entry: dict[str, Any]) -> None:
    """A shape with a negative dimension."""
    entry["shape"] = [-RANK, entry["shape"][1]]


@entry_attack("data_offsets outside", last=True)
def offsets_out_of_range(entry: dict[str, Any]) -> None:
    """data_offsets end 1 MiB past the end of the data section."""
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [start + (1 << 20), end + (1 << 20)]


@entry_attack("data_offsets outside")
def offsets_reversed(entry: dict[str, Any]) -> None:
    """data_offsets with end before start (negative length)."""
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [end, start]


@entry_attack("tensor data overlaps tensor", last=True)
def offsets_overlap(entry: dict[str, Any]) -> None:
    """The last tensor's data starts 4 bytes inside the previous tensor (aliased storage)."""
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [start - 4, end - 4]


@entry_attack("data_offsets span")
def offsets_span_mismatch(entry: dict[str, Any]) -> None:
    """data_offsets cover 4 bytes fewer than shape x dtype needs (short read)."""
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [start, end - 4]


@entry_attack("tensor shape claims more than")
def zip_bomb_shape(entry: dict[str, Any]) -> None:
    """Zip-bomb-like size claim: a [2**31, 2**31] F32 tensor (16 EiB) in a few-KB file."""
    entry["shape"] = [2**31, 2**31]


@header_attack("tensor shape claims more than")
def shape_bigint(shapes: Shapes) -> Header:
    """Shape dims of 4000 decimal digits with empty data_offsets (bignum size claim)."""
    big = "1" + "0" * 3999
    entry = '{"dtype": "F32", "shape": [' + big + ", " + big + '], "data_offsets": [0, 0]}'
    return "{" + json.dumps(first_module(shapes)[1]) + ": " + entry + "}"


@header_attack("more than 4096 tensors")
def too_many_tensors(shapes: Shapes) -> Header:
    """5000 (empty) tensor entries: more than the tensor-count limit."""
    return {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [0],
            "data_offsets": [0, 0],
        }
        for i in range(5000)
    }


@header_attack("adapter has no tensors")
def no_tensors(shapes: Shapes) -> Header:
    """A header with only __metadata__ (zero modules)."""
    return {"__metadata__": {"format": "pt"}}
