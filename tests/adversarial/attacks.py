"""A corpus of hostile PEFT LoRA adapter folders, each with the refusal it must cause.

Every attack is a named function that writes one adapter folder (bytes crafted by hand where the
safetensors header itself is the attack: 8-byte little-endian header length + JSON + data) and is
registered in :data:`ATTACKS` with the substring the :class:`AdapterValidationError` message must
contain and the file the error must name. The same corpus can be replayed against a live server::

    python -m tests.adversarial.attacks OUT_DIR [--base-model MODEL_DIR]

writes ``OUT_DIR/attacks/<name>/`` for every attack, ``OUT_DIR/good/`` (a valid adapter, the
control), ``OUT_DIR/base_model/`` (a tiny random Llama, unless ``--base-model`` is given: then the
adapters are shaped for that model) and ``OUT_DIR/manifest.json``::

    {"base_model": ..., "good": ..., "attacks": [{"name", "path", "expected", "culprit", "description"}],
     "path_attacks": [{"name", "request_path", "expected", "symlink_target"}]}

Replaying (e.g. ``POST /v1/load_lora_adapter {"lora_name": name, "lora_path": path}``) must refuse
every attack, with ``expected`` in the error text, and accept ``good``. ``path_attacks`` are request
paths (``lora_path`` values) that :func:`vllm_safeguard.paths.contained_path` must refuse when the
adapter root is ``OUT_DIR/attacks``; ``{root}`` in a request path stands for that root.

Nothing in the corpus executes anything: the pickle checkpoint holds a harmless ``print`` canary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from vllm_safeguard.adapter import layer_index, module_kind
from vllm_safeguard.adapter_io import CONFIG_NAME, WEIGHTS_NAME, module_shapes_from_model_dir, peft_key

Shapes = Mapping[str, tuple[int, int]]
Writer = Callable[[Path, Shapes], None]

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
    set, ``root/<name>`` must first be made a symlink to it (``main`` does this).
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
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        ATTACKS.append(Attack(fn.__name__, expected, culprit, doc, fn))
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


def write_config(folder: Path, cfg: Mapping[str, Any] | str | bytes) -> None:
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
    header: Mapping[str, Any] | str | bytes,
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


def _first(shapes: Shapes) -> tuple[str, str, str]:
    """(module, lora_A key, lora_B key) of the first adapted module."""
    m = target_modules(shapes)[0]
    return m, peft_key(m, "A"), peft_key(m, "B")


def _good_parts(shapes: Shapes) -> tuple[dict[str, Any], bytes]:
    return split_safetensors(good_tensors(shapes))


def _last_in_data(header: Mapping[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ------------------------------------------------------------------------- safetensors framing


@attack("header length over the")
def header_length_huge(folder: Path, shapes: Shapes) -> None:
    """Header length prefix claims 2**64 - 1 bytes (allocation bomb)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
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


@attack("header is not valid JSON")
def header_not_json(folder: Path, shapes: Shapes) -> None:
    """Header bytes are not JSON (truncated object)."""
    write_config(folder, good_config(shapes))
    write_weights(folder, b'{"base_model.model.x.lora_A.weight": {"dtype": "F32", "sha')


@attack("header is not valid JSON")
def header_invalid_utf8(folder: Path, shapes: Shapes) -> None:
    """Header holds invalid UTF-8 bytes."""
    write_config(folder, good_config(shapes))
    write_weights(folder, b'{"\xff\xfe\xfd": {}}')


@attack("header is not valid JSON")
def header_nan_constant(folder: Path, shapes: Shapes) -> None:
    """Header uses the non-standard JSON constant NaN as a data offset."""
    write_config(folder, good_config(shapes))
    _, ka, _ = _first(shapes)
    entry = '{"dtype": "F32", "shape": [4, 4], "data_offsets": [NaN, 64]}'
    write_weights(folder, "{" + json.dumps(ka) + ": " + entry + "}")


@attack("header is not valid JSON")
def header_deeply_nested(folder: Path, shapes: Shapes) -> None:
    """Header is 100k nested arrays (parser stack exhaustion)."""
    write_config(folder, good_config(shapes))
    write_weights(folder, "[" * 100_000 + "]" * 100_000)


@attack("header must be a JSON object")
def header_not_object(folder: Path, shapes: Shapes) -> None:
    """Header is a JSON array, not an object."""
    write_config(folder, good_config(shapes))
    write_weights(folder, "[1, 2, 3]")


@attack("malformed tensor entry")
def header_entry_extra_field(folder: Path, shapes: Shapes) -> None:
    """A tensor entry carries an unknown field next to dtype/shape/data_offsets."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    header[ka]["__reduce__"] = "os.system"
    write_weights(folder, header, data)


@attack("duplicate key in JSON object")
def header_duplicate_tensor_key(folder: Path, shapes: Shapes) -> None:
    """The same tensor name appears twice in the header (last-wins parsers disagree)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    text = json.dumps(header)
    dup = json.dumps({ka: header[ka]})[1:-1]
    write_weights(folder, "{" + dup + ", " + text[1:], data)


@attack("dtype not allowed")
def dtype_not_allowed(folder: Path, shapes: Shapes) -> None:
    """Tensors declared as I64 (integer tensors are not LoRA factors)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    header[ka]["dtype"] = "I64"
    write_weights(folder, header, data)


@attack("dtype not allowed")
def dtype_object(folder: Path, shapes: Shapes) -> None:
    """dtype is a JSON object naming a class to import, not a dtype tag."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    header[ka]["dtype"] = {"__class__": "torch.float32", "module": "builtins"}
    write_weights(folder, header, data)


@attack("malformed shape")
def shape_negative(folder: Path, shapes: Shapes) -> None:
    """A shape with a negative dimension."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    header[ka]["shape"] = [-RANK, header[ka]["shape"][1]]
    write_weights(folder, header, data)


@attack("data_offsets outside")
def offsets_out_of_range(folder: Path, shapes: Shapes) -> None:
    """data_offsets end 1 MiB past the end of the data section."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    last = _last_in_data(header)
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + (1 << 20), end + (1 << 20)]
    write_weights(folder, header, data)


@attack("data_offsets outside")
def offsets_reversed(folder: Path, shapes: Shapes) -> None:
    """data_offsets with end before start (negative length)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    start, end = header[ka]["data_offsets"]
    header[ka]["data_offsets"] = [end, start]
    write_weights(folder, header, data)


@attack("tensor data overlaps tensor")
def offsets_overlap(folder: Path, shapes: Shapes) -> None:
    """The last tensor's data starts 4 bytes inside the previous tensor (aliased storage)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    last = _last_in_data(header)
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start - 4, end - 4]
    write_weights(folder, header, data)


@attack("data_offsets span")
def offsets_span_mismatch(folder: Path, shapes: Shapes) -> None:
    """data_offsets cover 4 bytes fewer than shape x dtype needs (short read)."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    start, end = header[ka]["data_offsets"]
    header[ka]["data_offsets"] = [start, end - 4]
    write_weights(folder, header, data)


@attack("tensor shape claims more than")
def zip_bomb_shape(folder: Path, shapes: Shapes) -> None:
    """Zip-bomb-like size claim: a [2**31, 2**31] F32 tensor (16 EiB) in a few-KB file."""
    write_config(folder, good_config(shapes))
    header, data = _good_parts(shapes)
    _, ka, _ = _first(shapes)
    header[ka]["shape"] = [2**31, 2**31]
    write_weights(folder, header, data)


@attack("tensor shape claims more than")
def shape_bigint(folder: Path, shapes: Shapes) -> None:
    """Shape dims of 4000 decimal digits with empty data_offsets (bignum size claim)."""
    write_config(folder, good_config(shapes))
    _, ka, _ = _first(shapes)
    big = "1" + "0" * 3999
    entry = '{"dtype": "F32", "shape": [' + big + ", " + big + '], "data_offsets": [0, 0]}'
    write_weights(folder, "{" + json.dumps(ka) + ": " + entry + "}")


@attack("more than 4096 tensors")
def too_many_tensors(folder: Path, shapes: Shapes) -> None:
    """5000 (empty) tensor entries: more than the tensor-count limit."""
    write_config(folder, good_config(shapes))
    header = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [0],
            "data_offsets": [0, 0],
        }
        for i in range(5000)
    }
    write_weights(folder, header)


@attack("adapter has no tensors")
def no_tensors(folder: Path, shapes: Shapes) -> None:
    """A header with only __metadata__ (zero modules)."""
    write_config(folder, good_config(shapes))
    write_weights(folder, {"__metadata__": {"format": "pt"}})


# ---------------------------------------------------------------------------------- tensor values


@attack("non-finite values")
def nan_values(folder: Path, shapes: Shapes) -> None:
    """lora_A holds a NaN."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    _, ka, _ = _first(shapes)
    tensors[ka][0, 0] = float("nan")
    write_tensors(folder, tensors)


@attack("non-finite values")
def inf_values_fp16(folder: Path, shapes: Shapes) -> None:
    """An fp16 adapter whose lora_B holds +Inf."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes, dtype=torch.float16)
    _, _, kb = _first(shapes)
    tensors[kb][-1, -1] = float("inf")
    write_tensors(folder, tensors)


@attack("overflows")
def scaled_update_overflow(folder: Path, shapes: Shapes) -> None:
    """Finite factors (B = 1e30) with lora_alpha = 1e12: scaling * B @ A is Inf."""
    write_config(folder, good_config(shapes, lora_alpha=1e12))
    tensors = good_tensors(shapes)
    _, _, kb = _first(shapes)
    tensors[kb].fill_(1e30)
    write_tensors(folder, tensors)


@attack("tensors mix dtypes")
def mixed_dtypes(folder: Path, shapes: Shapes) -> None:
    """lora_A in fp32, the rest in fp16."""
    write_config(folder, good_config(shapes))
    tensors = {k: v.half() for k, v in good_tensors(shapes).items()}
    _, ka, _ = _first(shapes)
    tensors[ka] = tensors[ka].float()
    write_tensors(folder, tensors)


@attack("empty tensor")
def empty_tensors(folder: Path, shapes: Shapes) -> None:
    """lora_A is [0, in] and lora_B is [out, 0] (zero-size tensors)."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    _, ka, kb = _first(shapes)
    tensors[ka] = torch.zeros(0, tensors[ka].shape[1])
    tensors[kb] = torch.zeros(tensors[kb].shape[0], 0)
    write_tensors(folder, tensors)


# ------------------------------------------------------------------------------ names and shapes


@attack("key is not a LoRA weight name")
def smuggled_full_weight(folder: Path, shapes: Shapes) -> None:
    """A full embed_tokens.weight smuggled next to the LoRA factors (bypasses the LoRA repair)."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(8, 8)
    write_tensors(folder, tensors)


@attack("key is not a LoRA weight name")
def key_path_traversal(folder: Path, shapes: Shapes) -> None:
    """A tensor name holding ../ path segments."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    tensors["base_model.model.../../../../etc/passwd.lora_A.weight"] = tensors.pop(_first(shapes)[1])
    write_tensors(folder, tensors)


@attack("key is not a LoRA weight name")
def key_empty_components(folder: Path, shapes: Shapes) -> None:
    """A tensor name with empty '..' module-path components."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    m, ka, kb = _first(shapes)
    bad = "." + m.replace(".", "..")
    tensors[peft_key(bad, "A")] = tensors.pop(ka)
    tensors[peft_key(bad, "B")] = tensors.pop(kb)
    write_tensors(folder, tensors)


@attack("key is not a LoRA weight name")
def key_trailing_newline(folder: Path, shapes: Shapes) -> None:
    """A tensor name ending in a newline (regex '$' would accept it)."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    _, ka, _ = _first(shapes)
    tensors[ka + "\n"] = tensors.pop(ka)
    write_tensors(folder, tensors)


@attack("lora_B missing for module")
def missing_lora_b(folder: Path, shapes: Shapes) -> None:
    """A module with lora_A but no lora_B."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    del tensors[_first(shapes)[2]]
    write_tensors(folder, tensors)


@attack("LoRA factors must be 2-D")
def factor_3d(folder: Path, shapes: Shapes) -> None:
    """lora_A is 3-D [r, in, 1]."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    _, ka, _ = _first(shapes)
    tensors[ka] = tensors[ka].unsqueeze(-1).contiguous()
    write_tensors(folder, tensors)


@attack("lora_A must have shape [r=4")
def tensors_rank_mismatch(folder: Path, shapes: Shapes) -> None:
    """Config says r=4, tensors have rank 8."""
    write_config(folder, good_config(shapes))
    write_tensors(folder, good_tensors(shapes, rank=2 * RANK))


@attack("shapes do not fit the base module")
def wrong_shape_for_base(folder: Path, shapes: Shapes) -> None:
    """lora_A's in_features is one more than the base module's."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    _, ka, _ = _first(shapes)
    tensors[ka] = torch.zeros(RANK, tensors[ka].shape[1] + 1)
    write_tensors(folder, tensors)


@attack("module does not exist in the base model")
def module_does_not_exist(folder: Path, shapes: Shapes) -> None:
    """An extra module in block 999, which the base model does not have."""
    write_config(folder, good_config(shapes))
    tensors = good_tensors(shapes)
    m, ka, kb = _first(shapes)
    ghost = f"model.layers.999.{module_kind(m)}"
    tensors[peft_key(ghost, "A")] = tensors[ka].clone()
    tensors[peft_key(ghost, "B")] = tensors[kb].clone()
    write_tensors(folder, tensors)


@attack("module does not exist in the base model")
def zero_modules_matched(folder: Path, shapes: Shapes) -> None:
    """A GPT-2-style adapter (transformer.h.N.attn.c_attn): none of its modules is in the base model."""
    write_config(folder, good_config(shapes, target_modules=["c_attn"]))
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(2):
        m = f"transformer.h.{i}.attn.c_attn"
        tensors[peft_key(m, "A")] = torch.randn(RANK, 64, generator=g) * 0.05
        tensors[peft_key(m, "B")] = torch.randn(192, RANK, generator=g) * 0.05
    write_tensors(folder, tensors)


@attack("shapes do not fit the base module")
def other_base_model(folder: Path, shapes: Shapes) -> None:
    """Same module names, but every shape is from a model twice as wide (adapter for another base)."""
    write_config(folder, good_config(shapes, base_model_name_or_path="some-org/wider-model-7b"))
    write_tensors(folder, good_tensors({m: (2 * o, 2 * i) for m, (o, i) in shapes.items()}))


# ----------------------------------------------------------------------------------------- config


@attack("config is not valid JSON", CONFIG_NAME)
def config_not_json(folder: Path, shapes: Shapes) -> None:
    """adapter_config.json is TOML-like text, not JSON."""
    write_config(folder, "[lora]\nr = 4\nlora_alpha = 8\n")
    write_tensors(folder, good_tensors(shapes))


@attack("config must be a JSON object", CONFIG_NAME)
def config_not_object(folder: Path, shapes: Shapes) -> None:
    """adapter_config.json is a JSON array."""
    write_config(folder, json.dumps([good_config(shapes)]))
    write_tensors(folder, good_tensors(shapes))


@attack("config is not valid JSON", CONFIG_NAME)
def config_deeply_nested(folder: Path, shapes: Shapes) -> None:
    """A config field nested 100k arrays deep (parser stack exhaustion)."""
    text = json.dumps(good_config(shapes))
    write_config(folder, text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    write_tensors(folder, good_tensors(shapes))


@attack("config larger than", CONFIG_NAME)
def config_too_large(folder: Path, shapes: Shapes) -> None:
    """A 300 KB config (whitespace padding), over the config size limit."""
    write_config(folder, json.dumps(good_config(shapes)) + " " * 300_000)
    write_tensors(folder, good_tensors(shapes))


@attack("string longer than", CONFIG_NAME)
def config_huge_string(folder: Path, shapes: Shapes) -> None:
    """base_model_name_or_path is a 100k-character string."""
    write_config(folder, good_config(shapes, base_model_name_or_path="A" * 100_000))
    write_tensors(folder, good_tensors(shapes))


@attack("string longer than", CONFIG_NAME)
def config_huge_key(folder: Path, shapes: Shapes) -> None:
    """A config field whose name is 10k characters long."""
    write_config(folder, good_config(shapes, **{"k" * 10_000: 1}))
    write_tensors(folder, good_tensors(shapes))


@attack("duplicate key in JSON object", CONFIG_NAME)
def config_duplicate_key(folder: Path, shapes: Shapes) -> None:
    """ "r" given twice (4, then 100000): parsers that keep the first and the last disagree."""
    write_config(folder, json.dumps(good_config(shapes))[:-1] + ', "r": 100000}')
    write_tensors(folder, good_tensors(shapes))


@attack("field is not allowed", CONFIG_NAME)
def config_auto_mapping(folder: Path, shapes: Shapes) -> None:
    """auto_mapping names a class and module to import."""
    mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "os"}
    write_config(folder, good_config(shapes, auto_mapping=mapping))
    write_tensors(folder, good_tensors(shapes))


@attack("field is not allowed", CONFIG_NAME)
def config_modules_to_save(folder: Path, shapes: Shapes) -> None:
    """modules_to_save ships full lm_head weights that bypass the LoRA repair."""
    write_config(folder, good_config(shapes, modules_to_save=["lm_head", "embed_tokens"]))
    write_tensors(folder, good_tensors(shapes))


@attack("only LoRA adapters are supported", CONFIG_NAME)
def config_peft_type_import(folder: Path, shapes: Shapes) -> None:
    """peft_type is an import expression, not LORA."""
    write_config(folder, good_config(shapes, peft_type="__import__('os').system('id')"))
    write_tensors(folder, good_tensors(shapes))


@attack("lora_alpha must be a positive finite number", CONFIG_NAME)
def config_alpha_code(folder: Path, shapes: Shapes) -> None:
    """lora_alpha is a code string, not a number."""
    write_config(folder, good_config(shapes, lora_alpha="__import__('os').getcwd()"))
    write_tensors(folder, good_tensors(shapes))


@attack("lora_alpha must be a positive finite number", CONFIG_NAME)
def config_alpha_bigint(folder: Path, shapes: Shapes) -> None:
    """lora_alpha is a 400-digit integer (beyond float range)."""
    text = json.dumps(good_config(shapes, lora_alpha=0))
    write_config(folder, text.replace('"lora_alpha": 0', '"lora_alpha": 1' + "0" * 400))
    write_tensors(folder, good_tensors(shapes))


@attack("config is not valid JSON", CONFIG_NAME)
def config_alpha_nan(folder: Path, shapes: Shapes) -> None:
    """lora_alpha is the non-standard JSON constant NaN."""
    text = json.dumps(good_config(shapes, lora_alpha=0))
    write_config(folder, text.replace('"lora_alpha": 0', '"lora_alpha": NaN'))
    write_tensors(folder, good_tensors(shapes))


@attack("DoRA adapters are not supported", CONFIG_NAME)
def config_use_dora(folder: Path, shapes: Shapes) -> None:
    """use_dora = true (magnitude vectors the repair does not handle)."""
    write_config(folder, good_config(shapes, use_dora=True))
    write_tensors(folder, good_tensors(shapes))


@attack("rank must be an integer in [1, 256]", CONFIG_NAME)
def rank_over_limit(folder: Path, shapes: Shapes) -> None:
    """r = 100000, over the rank limit."""
    write_config(folder, good_config(shapes, r=100_000))
    write_tensors(folder, good_tensors(shapes))


@attack("pattern keys must be plain module paths", CONFIG_NAME)
def rank_pattern_regex(folder: Path, shapes: Shapes) -> None:
    """rank_pattern key is a catastrophic-backtracking regex."""
    write_config(folder, good_config(shapes, rank_pattern={"^(a|a)*(a+)+$": RANK}))
    write_tensors(folder, good_tensors(shapes))


@attack("value must be a number in [1, 256]", CONFIG_NAME)
def rank_pattern_over_limit(folder: Path, shapes: Shapes) -> None:
    """rank_pattern gives one module rank 100000 (sneaks past the r limit)."""
    write_config(folder, good_config(shapes, rank_pattern={"q_proj": 100_000}))
    write_tensors(folder, good_tensors(shapes))


@attack("value must be a number in [1, 256]", CONFIG_NAME)
def rank_pattern_bigint(folder: Path, shapes: Shapes) -> None:
    """rank_pattern value is a 400-digit integer."""
    text = json.dumps(good_config(shapes, rank_pattern={"q_proj": 0}))
    write_config(folder, text.replace('"q_proj": 0', '"q_proj": 1' + "0" * 400))
    write_tensors(folder, good_tensors(shapes))


@attack("too many entries", CONFIG_NAME)
def rank_pattern_too_many(folder: Path, shapes: Shapes) -> None:
    """rank_pattern with 5000 entries (per-module lookup cost amplification)."""
    write_config(folder, good_config(shapes, rank_pattern={f"m{i}": RANK for i in range(5000)}))
    write_tensors(folder, good_tensors(shapes))


@attack("lora_A must have shape [r=8", WEIGHTS_NAME)
def rank_pattern_mismatch(folder: Path, shapes: Shapes) -> None:
    """rank_pattern claims rank 8 for every module while the tensors have rank 4."""
    kinds = sorted({module_kind(m) for m in target_modules(shapes)})
    write_config(folder, good_config(shapes, rank_pattern=dict.fromkeys(kinds, 2 * RANK)))
    write_tensors(folder, good_tensors(shapes))


@attack("value must be a number in", CONFIG_NAME)
def alpha_pattern_bigint(folder: Path, shapes: Shapes) -> None:
    """alpha_pattern value is a 400-digit integer."""
    text = json.dumps(good_config(shapes, alpha_pattern={"q_proj": 0}))
    write_config(folder, text.replace('"q_proj": 0', '"q_proj": 1' + "0" * 400))
    write_tensors(folder, good_tensors(shapes))


# ------------------------------------------------------------------------------------ folder/files

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


# ------------------------------------------------------------------------------------------ main


def write_corpus(out_dir: str | os.PathLike[str], base_model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write every attack, the good control and the manifest under ``out_dir``; return the manifest."""
    out = Path(out_dir)
    shapes = module_shapes_from_model_dir(base_model_dir)
    root = out / "attacks"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    good = out / "good"
    if good.exists():
        shutil.rmtree(good)
    good.mkdir()
    write_good(good, shapes)
    entries = []
    for a in ATTACKS:
        path = a.build_for_shapes(root / a.name, shapes)
        entries.append(
            {
                "name": a.name,
                "path": str(path),
                "expected": a.expected,
                "culprit": a.culprit,
                "description": a.description,
            }
        )
    for p in PATH_ATTACKS:
        if p.symlink_target is not None:
            os.symlink(p.symlink_target, root / p.request_path)
    manifest = {
        "base_model": str(Path(base_model_dir).resolve()),
        "good": str(good),
        "adapter_root": str(root),
        "attacks": entries,
        "path_attacks": [
            {
                "name": p.name,
                "request_path": p.request_path,
                "expected": p.expected,
                "symlink_target": p.symlink_target,
            }
            for p in PATH_ATTACKS
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument(
        "--base-model", type=Path, default=None, help="HF model folder (default: a tiny random Llama)"
    )
    args = ap.parse_args(argv)
    base = args.base_model
    if base is None:
        from vllm_safeguard.testing import make_tiny_llama

        base = make_tiny_llama(args.out_dir / "base_model")
    manifest = write_corpus(args.out_dir, base)
    print(f"wrote {len(manifest['attacks'])} attacks and the good control to {args.out_dir}")
    print(f"{len(manifest['path_attacks'])} request-path attacks listed in {args.out_dir / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
