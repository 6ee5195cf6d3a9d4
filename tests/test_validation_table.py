"""Issue 2: every validation error case raises AdapterValidationError with a message naming the problem.

Table-driven: each row takes a valid adapter written by the project's own writer
(:func:`vllm_safeguard.testing.write_random_adapter`, rank 4, all seven Llama targets, for a tiny
random Llama built at test time), applies ONE explicit bad change, and states the message substring
(the problem) and the file the error must name. The larger hostile corpus is in tests/adversarial/.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_safeguard.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from vllm_safeguard.core.model_files import module_shapes_from_model_dir
from vllm_safeguard.errors import AdapterValidationError
from vllm_safeguard.testing.tiny import TinyLlamaSpec, make_tiny_llama, write_random_adapter

SPEC = TinyLlamaSpec()
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
FOLDER = ""  # the error names the adapter folder itself

# ------------------------------------------------------------------------------ mutation helpers


def set_config(**changes: Any) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        cfg.update(changes)
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))

    return mutate


def config_text(text: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text)

    return mutate


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS_NAME))
        fn(tensors)
        save_file(tensors, str(folder / WEIGHTS_NAME))

    return mutate


def edit_header(
    fn: Callable[[dict[str, Any]], object], *, length: int | None = None
) -> Callable[[Path], None]:
    """Rewrite the safetensors header JSON (data section untouched); ``length`` forces the prefix."""

    def mutate(folder: Path) -> None:
        blob = (folder / WEIGHTS_NAME).read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        fn(header)
        raw = json.dumps(header).encode()
        (folder / WEIGHTS_NAME).write_bytes(
            struct.pack("<Q", len(raw) if length is None else length) + raw + blob[8 + n :]
        )

    return mutate


def raw_header(raw: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw)

    return mutate


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    d[key] = value


def _last_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])


def _shift_last(header: dict[str, Any], by: int) -> None:
    entry = _last_tensor(header)
    entry["data_offsets"] = [o + by for o in entry["data_offsets"]]


def _replace_weights_with_file(folder: Path) -> None:
    os.remove(folder / WEIGHTS_NAME)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1


def _symlink_weights_outside(folder: Path) -> None:
    outside = folder.parent / "outside.safetensors"
    os.replace(folder / WEIGHTS_NAME, outside)
    os.symlink(outside, folder / WEIGHTS_NAME)


def _rename_module(tensors: dict[str, torch.Tensor], old: str, new: str) -> None:
    for ab in ("A", "B"):
        tensors[f"{new}.lora_{ab}.weight"] = tensors.pop(f"{old}.lora_{ab}.weight")


# ------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    id: str
    bad_input: str  # the one change made to a valid adapter
    mutate: Callable[[Path], None]
    expected: str  # substring of the message: the problem, in words
    culprit: str  # the file the error must name ("" = the adapter folder)


ROWS = [
    Row("missing_weights", "adapter_model.safetensors deleted", lambda f: os.remove(f / WEIGHTS_NAME),
        "missing adapter_model.safetensors", FOLDER),
    Row("missing_config", "adapter_config.json deleted", lambda f: os.remove(f / CONFIG_NAME),
        "missing adapter_config.json", FOLDER),
    Row("pickle_only", "safetensors replaced by a pickle adapter_model.bin", _replace_weights_with_file,
        "only a pickle checkpoint was found", "adapter_model.bin"),
    Row("symlink_escape", "adapter_model.safetensors is a symlink to a file outside the folder",
        _symlink_weights_outside, "file is a link that escapes the adapter folder", WEIGHTS_NAME),
    Row("config_not_json", "config text '{\"r\": 4,' (truncated JSON)", config_text('{"r": 4,'),
        "config is not valid JSON", CONFIG_NAME),
    Row("config_not_object", "config is the JSON string \"lora\"", config_text('"lora"'),
        "config must be a JSON object", CONFIG_NAME),
    Row("peft_type_not_lora", "peft_type = PREFIX_TUNING", set_config(peft_type="PREFIX_TUNING"),
        "only LoRA adapters are supported", CONFIG_NAME),
    Row("auto_mapping", "auto_mapping = {parent_library: 'subprocess'}",
        set_config(auto_mapping={"base_model_class": "X", "parent_library": "subprocess"}),
        "field is not allowed", CONFIG_NAME),
    Row("use_dora", "use_dora = true", set_config(use_dora=True), "DoRA adapters are not supported",
        CONFIG_NAME),
    Row("rank_zero", "r = 0", set_config(r=0), "rank must be an integer in [1, 256]", CONFIG_NAME),
    Row("rank_over_limit", "r = 512 (limit 256)", set_config(r=512), "rank must be an integer in [1, 256]",
        CONFIG_NAME),
    Row("rank_float", "r = 4.5", set_config(r=4.5), "rank must be an integer in [1, 256]", CONFIG_NAME),
    Row("alpha_negative", "lora_alpha = -8", set_config(lora_alpha=-8),
        "lora_alpha must be a positive finite number", CONFIG_NAME),
    Row("rank_pattern_regex", "rank_pattern = {'.*q_proj': 4}", set_config(rank_pattern={".*q_proj": 4}),
        "pattern keys must be plain module paths", CONFIG_NAME),
    Row("alpha_pattern_zero", "alpha_pattern = {'q_proj': 0}", set_config(alpha_pattern={"q_proj": 0}),
        "value must be a number in", CONFIG_NAME),
    Row("string_too_long", "base_model_name_or_path is 5000 characters",
        set_config(base_model_name_or_path="m" * 5000), "string longer than 4096 characters", CONFIG_NAME),
    Row("header_length_over_limit", "header length prefix = 2**40",
        edit_header(lambda h: None, length=2**40), "header length over the", WEIGHTS_NAME),
    Row("header_not_json", "header bytes b'{\"a\": '", raw_header(b'{"a": '), "header is not valid JSON",
        WEIGHTS_NAME),
    Row("dtype_f64", "q_proj lora_A declared F64",
        edit_header(lambda h: _set(h[f"{Q0}.lora_A.weight"], "dtype", "F64")), "dtype not allowed",
        WEIGHTS_NAME),
    Row("offsets_outside", "last tensor's data_offsets shifted 4096 bytes past the data",
        edit_header(lambda h: _shift_last(h, 4096)), "data_offsets outside", WEIGHTS_NAME),
    Row("offsets_overlap", "last tensor's data_offsets shifted 4 bytes back into its neighbour",
        edit_header(lambda h: _shift_last(h, -4)), "tensor data overlaps tensor", WEIGHTS_NAME),
    Row("nan_value", "q_proj lora_B[0, 0] = NaN",
        edit_tensors(lambda t: t[f"{Q0}.lora_B.weight"].__setitem__((0, 0), float("nan"))),
        "tensor holds non-finite values", WEIGHTS_NAME),
    Row("non_lora_key", "extra tensor base_model.model.lm_head.weight",
        edit_tensors(lambda t: _set(t, "base_model.model.lm_head.weight", torch.zeros(4, 4))),
        "key is not a LoRA weight name", WEIGHTS_NAME),
    Row("missing_lora_a", "q_proj lora_A removed", edit_tensors(lambda t: t.pop(f"{Q0}.lora_A.weight")),
        "lora_A missing for module", WEIGHTS_NAME),
    Row("factor_1d", "q_proj lora_A flattened to 1-D",
        edit_tensors(lambda t: _set(t, f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"].flatten())),
        "LoRA factors must be 2-D", WEIGHTS_NAME),
    Row("rank_mismatch", "config r = 2 while the tensors have rank 4", set_config(r=2, lora_alpha=4),
        "lora_A must have shape [r=2, in]", WEIGHTS_NAME),
    Row("mixed_dtypes", "q_proj lora_A stored as fp16, the rest fp32",
        edit_tensors(lambda t: _set(t, f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"].half())),
        "tensors mix dtypes", WEIGHTS_NAME),
    Row("module_not_in_base", "q_proj of block 0 renamed to block 7 (the model has 2)",
        edit_tensors(lambda t: _rename_module(t, Q0, Q0.replace("layers.0", "layers.7"))),
        "module does not exist in the base model", WEIGHTS_NAME),
    Row("shape_not_base", "q_proj lora_A has in_features 65 (base has 64)",
        edit_tensors(lambda t: _set(t, f"{Q0}.lora_A.weight", torch.zeros(4, 65))),
        "shapes do not fit the base module", WEIGHTS_NAME),
    Row("no_tensors", "header holds only __metadata__", raw_header(b'{"__metadata__": {"format": "pt"}}'),
        "adapter has no tensors", WEIGHTS_NAME),
]  # fmt: skip


@pytest.fixture(scope="module")
def base_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, int]]:
    """Module shapes of a tiny random Llama written at test time."""
    return module_shapes_from_model_dir(make_tiny_llama(tmp_path_factory.mktemp("table_base"), SPEC))


def _good(tmp_path: Path) -> Path:
    return write_random_adapter(tmp_path / "adapter", SPEC, rank=4, alpha=8.0, seed=3)


def test_table_size() -> None:
    assert len(ROWS) >= 15
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_valid_adapter_passes(tmp_path: Path, base_shapes: dict[str, tuple[int, int]]) -> None:
    adapter = load_adapter(_good(tmp_path), base_shapes=base_shapes)
    assert len(adapter.modules) == len(SPEC.module_shapes())


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_validation_error(row: Row, tmp_path: Path, base_shapes: dict[str, tuple[int, int]]) -> None:
    folder = _good(tmp_path)
    row.mutate(folder)
    with pytest.raises(AdapterValidationError) as info:
        load_adapter(folder, base_shapes=base_shapes)
    err = info.value
    assert type(err) is AdapterValidationError
    assert row.expected in err.problem, f"{row.id} ({row.bad_input}): {err}"
    assert row.expected in str(err)
    assert err.file is not None and err.file in str(err)
    if row.culprit == FOLDER:
        assert os.path.realpath(err.file) == os.path.realpath(folder)
    else:
        assert Path(err.file).name == row.culprit, f"{row.id}: {err}"
