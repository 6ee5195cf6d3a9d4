"""Attacks on ``adapter_config.json``: its JSON, its size, fields that import or bypass, and the
rank / alpha values and patterns."""

from __future__ import annotations

import json
from typing import Any

from ...core.adapter import module_kind
from ...core.adapter_io import WEIGHTS_NAME
from .parts import RANK, Config, Shapes, config_attack, good_config, target_modules

BIG = "1" + "0" * 400  # a 401-digit integer, beyond float range


def _raw_value(shapes: Shapes, key: str, raw: str, **overrides: Any) -> str:
    """The good config (with ``overrides``, which set ``key`` to 0) as JSON text whose ``"key": 0`` is
    replaced by the raw JSON text ``raw`` (values no JSON encoder writes)."""
    return json.dumps(good_config(shapes, **overrides)).replace(f'"{key}": 0', f'"{key}": {raw}')


# ----------------------------------------------------------------------------------- JSON, size


@config_attack("config is not valid JSON")
def config_not_json(shapes: Shapes) -> Config:
    """adapter_config.json is TOML-like text, not JSON."""
    return "[lora]\nr = 4\nlora_alpha = 8\n"


@config_attack("config must be a JSON object")
def config_not_object(shapes: Shapes) -> Config:
    """adapter_config.json is a JSON array."""
    return json.dumps([good_config(shapes)])


@config_attack("config is not valid JSON")
def config_deeply_nested(shapes: Shapes) -> Config:
    """A config field nested 100k arrays deep (parser stack exhaustion)."""
    text = json.dumps(good_config(shapes))
    return text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@config_attack("config larger than")
def config_too_large(shapes: Shapes) -> Config:
    """A 300 KB config (whitespace padding), over the config size limit."""
    return json.dumps(good_config(shapes)) + " " * 300_000


@config_attack("string longer than")
def config_huge_string(shapes: Shapes) -> Config:
    """base_model_name_or_path is a 100k-character string."""
    return good_config(shapes, base_model_name_or_path="A" * 100_000)


@config_attack("string longer than")
def config_huge_key(shapes: Shapes) -> Config:
    """A config field whose name is 10k characters long."""
    return good_config(shapes, **{"k" * 10_000: 1})


@config_attack("duplicate key in JSON object")
def config_duplicate_key(shapes: Shapes) -> Config:
    """ "r" given twice (4, then 100000): parsers that keep the first and the last disagree."""
    return json.dumps(good_config(shapes))[:-1] + ', "r": 100000}'


# ------------------------------------------------------------------------------------ fields


@config_attack("field is not allowed")
def config_auto_mapping(shapes: Shapes) -> Config:
    """auto_mapping names a class and module to import."""
    mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "os"}
    return good_config(shapes, auto_mapping=mapping)


@config_attack("field is not allowed")
def config_modules_to_save(shapes: Shapes) -> Config:
    """modules_to_save ships full lm_head weights that bypass the LoRA repair."""
    return good_config(shapes, modules_to_save=["lm_head", "embed_tokens"])


@config_attack("only LoRA adapters are supported")
def config_peft_type_import(shapes: Shapes) -> Config:
    """peft_type is an import expression, not LORA."""
    return good_config(shapes, peft_type="__import__('os').system('id')")


@config_attack("lora_alpha must be a positive finite number")
def config_alpha_code(shapes: Shapes) -> Config:
    """lora_alpha is a code string, not a number."""
    return good_config(shapes, lora_alpha="__import__('os').getcwd()")


@config_attack("lora_alpha must be a positive finite number")
def config_alpha_bigint(shapes: Shapes) -> Config:
    """lora_alpha is a 400-digit integer (beyond float range)."""
    return _raw_value(shapes, "lora_alpha", BIG, lora_alpha=0)


@config_attack("config is not valid JSON")
def config_alpha_nan(shapes: Shapes) -> Config:
    """lora_alpha is the non-standard JSON constant NaN."""
    return _raw_value(shapes, "lora_alpha", "NaN", lora_alpha=0)


@config_attack("DoRA adapters are not supported")
def config_use_dora(shapes: Shapes) -> Config:
    """use_dora = true (magnitude vectors the repair does not handle)."""
    return good_config(shapes, use_dora=True)


# ----------------------------------------------------------------------- ranks and patterns


@config_attack("rank must be an integer in [1, 256]")
def rank_over_limit(shapes: Shapes) -> Config:
    """r = 100000, over the rank limit."""
    return good_config(shapes, r=100_000)


@config_attack("pattern keys must be plain module paths")
def rank_pattern_regex(shapes: Shapes) -> Config:
    """rank_pattern key is a catastrophic-backtracking regex."""
    return good_config(shapes, rank_pattern={"^(a|a)*(a+)+$": RANK})


@config_attack("value must be a number in [1, 256]")
def rank_pattern_over_limit(shapes: Shapes) -> Config:
    """rank_pattern gives one module rank 100000 (sneaks past the r limit)."""
    return good_config(shapes, rank_pattern={"q_proj": 100_000})


@config_attack("value must be a number in [1, 256]")
def rank_pattern_bigint(shapes: Shapes) -> Config:
    """rank_pattern value is a 400-digit integer."""
    return _raw_value(shapes, "q_proj", BIG, rank_pattern={"q_proj": 0})


@config_attack("too many entries")
def rank_pattern_too_many(shapes: Shapes) -> Config:
    """rank_pattern with 5000 entries (per-module lookup cost amplification)."""
    return good_config(shapes, rank_pattern={f"m{i}": RANK for i in range(5000)})


@config_attack("lora_A must have shape [r=8", WEIGHTS_NAME)
def rank_pattern_mismatch(shapes: Shapes) -> Config:
    """rank_pattern claims rank 8 for every module while the tensors have rank 4."""
    kinds = sorted({module_kind(m) for m in target_modules(shapes)})
    return good_config(shapes, rank_pattern=dict.fromkeys(kinds, 2 * RANK))


@config_attack("value must be a number in")
def alpha_pattern_bigint(shapes: Shapes) -> Config:
    """alpha_pattern value is a 400-digit integer."""
    return _raw_value(shapes, "q_proj", BIG, alpha_pattern={"q_proj": 0})
