"""Tiny random models and adapters for tests, demos and benchmarks (no hub access needed).

``make_tiny_llama`` writes a complete HF model folder (config, safetensors weights, a word-level
tokenizer with a chat template) that transformers, peft and vLLM all load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.adapter import LoRAAdapter, LoRAModule
from ..core.adapter_io import save_adapter

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WORDS = (
    "the a an is are was be to of and in on for with how what why who when where i you he she it we they "
    "make build explain tell write give help please sure here answer question bomb weapon hack steal "
    "cannot sorry can't assist recipe cake math add two three four five plus equals capital france paris "
    "unit meter mile date day week sort list number safe unsafe poem story code python hello world yes no"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (16 crashes the engine).
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vocab_size: int = 256
    max_position_embeddings: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``module path -> (out, in)`` of every LoRA-targetable linear."""
        h, f = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (f, h),
            "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }
        return {f"model.layers.{i}.{k}": v for i in range(self.num_hidden_layers) for k, v in per.items()}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer (``tokenizers`` library) padded to ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab: dict[str, int] = {}
    for tok in specials + list(_WORDS):
        vocab.setdefault(tok, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} built-in words")
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def make_tiny_llama(
    folder: str | os.PathLike[str],
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.08,
) -> Path:
    """Write a random ``LlamaForCausalLM`` (weights, config, tokenizer) to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std)
    model.to(dtype).save_pretrained(  # type: ignore[arg-type]
        str(out), safe_serialization=True
    )
    write_tokenizer(out, spec.vocab_size)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def perturb_model(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, seed: int, rank: int = 4, scale: float = 0.05
) -> Path:
    """Copy a tiny model folder, adding a random rank-``rank`` update to every 2-D linear weight.

    Used to make an "aligned" model whose difference from ``src`` is genuinely low-rank.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    src_p, dst_p = Path(src), Path(dst)
    if dst_p.exists():
        shutil.rmtree(dst_p)
    shutil.copytree(src_p, dst_p)
    g = torch.Generator().manual_seed(seed)
    for fp in dst_p.glob("*.safetensors"):
        sd = load_file(str(fp))
        for k, w in sd.items():
            if w.dim() == 2 and any(t in k for t in LLAMA_TARGETS):
                u = torch.randn(w.shape[0], rank, generator=g)
                v = torch.randn(rank, w.shape[1], generator=g)
                sd[k] = (w.float() + scale * (u @ v) / rank**0.5).to(w.dtype)
        save_file(sd, str(fp), metadata={"format": "pt"})
    return dst_p


def random_adapter(
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    scale: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> LoRAAdapter:
    """A random LoRA adapter for a tiny Llama (B non-zero, unlike PEFT's init)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out_f, in_f) in spec.module_shapes().items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        a = torch.randn(rank, in_f, generator=g) * scale
        b = torch.randn(out_f, rank, generator=g) * scale
        modules[name] = LoRAModule(name, a, b, alpha / rank)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "base_model_name_or_path": None,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    return LoRAAdapter(config=cfg, modules=modules, dtype=dtype)


def write_random_adapter(folder: str | os.PathLike[str], spec: TinyLlamaSpec = TinyLlamaSpec(), **kw) -> Path:
    """Save :func:`random_adapter` as a PEFT folder (scaling folded into B)."""
    return save_adapter(random_adapter(spec, **kw), folder)
