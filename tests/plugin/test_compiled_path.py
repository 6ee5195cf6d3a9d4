"""The serving-time safety path as vLLM runs it on GPU by default: traced by ``torch.compile`` with
``fullgraph=True`` (Dynamo; guards are not re-checked between calls, as vLLM drops them), per-token
alpha changed between calls in place, no recompilation.

A module shaped like vLLM's LoRA layers (``BaseLinearLayerWithLoRA._apply_lora_to_output`` calls
``self.punica_wrapper.add_lora_linear(output, x, lora_a_stacked, lora_b_stacked, 1.0, output_slices)``)
is bound to the plugin's CPU safety wrapper and compiled with a backend that records the FX graph and
runs it: the graph must hold one ``safeguard.lora_linear`` call per bound layer (a layer that silently
took the parent's path would be missing) and reproduce eager outputs for every alpha. The guard's
score op on decoder layer L is traced the same way.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")

from kernels.torch_ops.guard_score import register_guard_score_op
from vllm_safeguard.alpha import AlphaTable
from vllm_safeguard.guard import GuardManifest, GuardProbe
from vllm_safeguard.integration.guard_runner import GuardBuffers, GuardRuntime, install_hook
from vllm_safeguard.integration.layer_table import LayerSafety

HIDDEN, R, RS, MAX_LORAS, TOKENS = 16, 4, 3, 2, 7
SLICES = (16, 8, 8)


class FakeLoRALinear(nn.Module):
    """The LoRA call of vLLM's linear layers, with random stacked task weights (2 slots + 1 zero)."""

    def __init__(self, seed: int, in_f: int, slices: tuple[int, ...]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(in_f, sum(slices), bias=False)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(sum(slices), in_f, generator=g) * 0.1)
        self.lora_a_stacked = tuple(torch.randn(MAX_LORAS + 1, 1, R, in_f, generator=g) * 0.2 for _ in slices)
        self.lora_b_stacked = tuple(torch.randn(MAX_LORAS + 1, 1, o, R, generator=g) * 0.2 for o in slices)
        for t in (*self.lora_a_stacked, *self.lora_b_stacked):
            t[-1].zero_()
        self.output_slices = slices
        self.punica_wrapper: Any = None

    def set_mapping(self, wrapper: Any) -> None:
        self.punica_wrapper = wrapper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        self.punica_wrapper.add_lora_linear(
            out, x, self.lora_a_stacked, self.lora_b_stacked, 1.0, self.output_slices
        )
        return out


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = FakeLoRALinear(0, HIDDEN, SLICES)
        self.o = FakeLoRALinear(1, sum(SLICES), (HIDDEN,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.relu(self.qkv(x)))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Decoder(), Decoder()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x)
        return x


def _safety(layer: FakeLoRALinear, seed: int) -> LayerSafety:
    g = torch.Generator().manual_seed(seed)
    in_f = layer.lora_a_stacked[0].shape[-1]
    return LayerSafety(
        "l",
        [torch.randn(RS, in_f, generator=g) * 0.3 for _ in layer.output_slices],
        [torch.randn(o, RS, generator=g) * 0.3 for o in layer.output_slices],
    )


def _wrapper() -> Any:
    from vllm.lora.layers import LoRAMapping

    from vllm_safeguard.integration.punica_wrapper.punica_cpu import SafeguardPunicaWrapperCPU

    w = SafeguardPunicaWrapperCPU(64, 8, "cpu")
    # request 1 (slot of lora 1, 3 tokens), a base-model request (2), request 3 (lora 2, 2 tokens)
    w.update_metadata(
        LoRAMapping((1, 1, 1, 0, 0, 2, 2), (1, 0, 2), is_prefill=True), [1, 2], MAX_LORAS + 1, 100
    )
    return w


class Recorder:
    """A torch.compile backend that keeps each FX graph and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs.append(gm)
        return gm.forward

    def calls(self, packet: Any) -> list[torch.fx.Node]:
        """Calls of a custom op (Dynamo records the packet; later passes use its overload)."""
        targets = (packet, packet.default)
        return [
            n for g in self.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in targets
        ]


def _bound_model() -> tuple[Model, Any, list[int]]:
    model = Model()
    w = _wrapper()
    layers: list[tuple[str, Any, LayerSafety | None]] = []
    for i, dec in enumerate(model.model.layers):
        layers.append((f"model.layers.{i}.qkv", dec.qkv, _safety(dec.qkv, 10 + i)))
        # o of layer 1 is outside the safety adapter's selected layers: task LoRA only, same op.
        layers.append((f"model.layers.{i}.o", dec.o, _safety(dec.o, 20 + i) if i == 0 else None))
    ids = w.bind_layers(layers)
    return model, w, ids


@torch.no_grad()
def test_bound_layers_compile_to_one_op_each_and_match_eager_for_every_alpha() -> None:
    model, w, ids = _bound_model()
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3))
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=False)
    outs = {}
    for alpha in (0.0, 0.5, 1.0, 2.0):
        w.set_token_alpha(torch.full((TOKENS,), alpha))  # in place, between calls
        outs[alpha] = compiled(x)
        torch.testing.assert_close(outs[alpha], model(x), rtol=0, atol=0)  # eager, same buffers
    assert len(rec.graphs) == 1, "alpha changes must not recompile"
    calls = rec.calls(torch.ops.safeguard.lora_linear)
    # Every bound layer is one op call carrying its static id: none took the parent's path.
    assert sorted(int(n.args[5]) for n in calls) == sorted(ids) and len(calls) == 4
    assert not torch.equal(outs[0.0], outs[1.0]) and not torch.equal(outs[1.0], outs[2.0])
    # Per-token alpha inside one batch: only tokens with alpha != 0 change.
    mixed = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    w.set_token_alpha(mixed)
    y = compiled(x)
    assert len(rec.graphs) == 1
    changed = (y != outs[0.0]).any(dim=1).tolist()
    assert changed == [False, False, False, True, True, False, False]


@torch.no_grad()
def test_compiled_alpha_zero_is_the_task_lora_alone() -> None:
    """alpha 0 through the compiled bound layers == the same layers bound without safety weights."""
    model, w, _ = _bound_model()
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(4))
    w.set_token_alpha(torch.zeros(TOKENS))
    y = torch.compile(model, backend=Recorder(), fullgraph=True)(x)
    plain = Model()
    w2 = _wrapper()
    w2.bind_layers(
        [
            (f"l{i}", m, None)
            for i, m in enumerate(
                [
                    plain.model.layers[0].qkv,
                    plain.model.layers[0].o,
                    plain.model.layers[1].qkv,
                    plain.model.layers[1].o,
                ]
            )
        ]
    )
    assert torch.equal(y, plain(x))


def _probe() -> GuardProbe:
    w = torch.zeros(HIDDEN)
    w[0] = 10.0
    m = GuardManifest(layer=0, hidden_size=HIDDEN, threshold=0.5, alpha_low=0.0, alpha_high=1.0)
    return GuardProbe(w, torch.tensor(0.0), torch.zeros(HIDDEN), torch.ones(HIDDEN), m)


@torch.no_grad()
def test_guard_score_op_runs_inside_the_compiled_graph() -> None:
    model, w, _ = _bound_model()
    register_guard_score_op()
    guard = GuardRuntime(_probe(), GuardBuffers.make(_probe(), 4, w.safeguard_alpha), AlphaTable())
    install_hook(model, guard)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=False)
    assert len(rec.calls(torch.ops.safeguard.guard_score)) == 0  # nothing traced yet
    results = []
    for step, last_token in enumerate((2, 4)):
        x = torch.zeros(TOKENS, HIDDEN)
        x[last_token, 0] = 5.0 if step == 0 else -5.0  # step 0: harmful, step 1: benign
        w.set_token_alpha(torch.full((TOKENS,), 0.5))
        # one request (tokens 0..last_token) ends its prefill in this step
        guard.plan_step(
            [f"r{step}", "other"],
            [last_token + 1, TOKENS - last_token - 1],
            [0, 9],
            [last_token + 1, 3],
            lambda i: (i == 0, False),
        )
        guard.apply(TOKENS)
        compiled(x)
        results.append(w.safeguard_alpha[:TOKENS].tolist())
        guard.collect()
    assert len(rec.graphs) == 1 and len(rec.calls(torch.ops.safeguard.guard_score)) == 1
    assert results[0] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert results[1] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    assert (guard.table.get("r0"), guard.table.get("r1")) == (1.0, 0.0)
    assert guard.scores_by_request["r0"] > 0.99 and guard.scores_by_request["r1"] < 0.01
