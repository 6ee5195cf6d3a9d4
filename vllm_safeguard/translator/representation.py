"""Factor-free adapter representation for the translator.

LoRA factors are ambiguous (``B R, R^-1 A`` give the same update), so the translator never reads
``A``/``B`` directly. Per module, with the alignment reference's top-``k`` directions ``U_k, S_k, Vh_k``:

    C      = U_k^T dW Vh_k^T            # [k, k] coordinates of the update in the alignment basis
    R_left = U_k^T dW (I - Vh_k^T Vh_k) # what the update writes into alignment output directions
                                        # from inputs outside the alignment input directions
    rest   = (I - U_k U_k^T) dW         # everything outside the alignment output subspace

``C`` and the norms of ``R_left``/``rest`` depend only on ``dW``, not on its factorization, and are
cheap (O((out + in) r k)). Why this choice: alignment lives (by construction of the reference) in
span(U_k) x span(Vh_k); a safety repair should be able to correct there and leave ``rest`` (where most
task knowledge lives) alone. A translator edit is::

    dW' = dW + U_k dC Vh_k - g * U_k R_left        (g in [0, 1]: shrink of the left remainder)

which is again a LoRA: ``B' = [s B - g U_k U_k^T s B | U_k (dC + g C)]``, ``A' = [A ; Vh_k]`` (rank r + k,
re-factorized to a bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import LoRAModule, layer_index, module_kind
from ..lowrank import bound_rank, frob2
from ..reference import ModuleSubspace

MODULE_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModuleView:
    """What the translator sees of one module (all sizes fixed by ``k``)."""

    coords: torch.Tensor  # [k, k]  C / s_1
    sv: torch.Tensor  # [k]     S_k / s_1
    left2: float  # ||R_left||^2 / s_1^2
    rest2: float  # ||rest||^2 / s_1^2
    risk: float  # sum_j s_j clamp(-C_jj, 0, s_j) / sum_j s_j^2
    kind: int  # index into MODULE_KINDS (len = unknown)
    layer_frac: float  # layer / (n_layers - 1)
    scale: float  # s_1 (to undo the normalisation)

    def features(self) -> torch.Tensor:
        """Flat feature vector: normalized coordinates, spectrum, energies, risk, kind one-hot, depth."""
        kind = torch.zeros(len(MODULE_KINDS) + 1)
        kind[self.kind] = 1.0
        scalars = torch.tensor([self.left2, self.rest2, self.risk, self.layer_frac]).log1p()
        return torch.cat([self.coords.flatten(), self.sv, scalars, kind])


def feature_dim(k: int) -> int:
    return k * k + k + 4 + len(MODULE_KINDS) + 1


def _top(sub: ModuleSubspace, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k factors, zero-padded when the reference kept fewer than k directions."""
    kk = min(k, sub.rank)
    u, s, vh = sub.u[:, :kk], sub.s[:kk], sub.vh[:kk]
    if kk < k:
        u = torch.cat([u, u.new_zeros(u.shape[0], k - kk)], 1)
        s = torch.cat([s, s.new_zeros(k - kk)])
        vh = torch.cat([vh, vh.new_zeros(k - kk, vh.shape[1])], 0)
    return u, s, vh


def view_module(mod: LoRAModule, sub: ModuleSubspace, k: int, n_layers: int) -> ModuleView:
    u, s, vh = _top(sub, k)
    b = mod.scaled_b()
    utb = u.T @ b  # [k, r]
    av = mod.lora_a @ vh.T  # [r, k]
    coords = utb @ av  # [k, k]
    s1 = float(s[0]) if float(s[0]) > 0 else 1.0
    # ||U^T dW||^2 = ||C||^2 + ||R_left||^2 (Vh rows orthonormal)
    inside = float(frob2(utb, mod.lora_a))
    left2 = max(inside - float((coords**2).sum()), 0.0)
    rest2 = max(float(frob2(b, mod.lora_a)) - inside, 0.0)
    diag = torch.diagonal(coords)
    mass = float((s**2).sum())
    risk = float((s * torch.minimum((-diag).clamp(min=0), s)).sum()) / mass if mass > 0 else 0.0
    kind = module_kind(mod.name)
    layer = layer_index(mod.name) or 0
    return ModuleView(
        coords=coords / s1,
        sv=s / s1,
        left2=left2 / s1**2,
        rest2=rest2 / s1**2,
        risk=risk,
        kind=MODULE_KINDS.index(kind) if kind in MODULE_KINDS else len(MODULE_KINDS),
        layer_frac=layer / max(n_layers - 1, 1),
        scale=s1,
    )


def left_overlap(unsafe: LoRAModule, safe: LoRAModule, sub: ModuleSubspace, k: int) -> tuple[float, float]:
    """``(||R_left(u)||^2, <R_left(u), R_left(s)>)`` — for the optimal shrink target ``g*``."""
    u, _, vh = _top(sub, k)

    def left(mod: LoRAModule) -> tuple[torch.Tensor, torch.Tensor]:
        utb = u.T @ mod.scaled_b()
        # R_left = (U^T B) A (I - Vh^T Vh) = (U^T B) [A - (A Vh^T) Vh]
        return utb, mod.lora_a - (mod.lora_a @ vh.T) @ vh

    bu, au = left(unsafe)
    bs, as_ = left(safe)
    return float(frob2(bu, au)), float(((bu.T @ bs) * (au @ as_.T)).sum())


def apply_edit(
    mod: LoRAModule, sub: ModuleSubspace, k: int, delta_coords: torch.Tensor, shrink: float, max_rank: int
) -> tuple[LoRAModule, float]:
    """``dW' = dW + U dC Vh - g U R_left`` as LoRA factors (``delta_coords`` in absolute units)."""
    u, _, vh = _top(sub, k)
    b = mod.scaled_b()
    coords = (u.T @ b) @ (mod.lora_a @ vh.T)
    b_new = torch.cat([b - shrink * (u @ (u.T @ b)), u @ (delta_coords + shrink * coords)], 1)
    a_new = torch.cat([mod.lora_a, vh], 0)
    b2, a2, kept = bound_rank(b_new, a_new, max_rank)
    return LoRAModule(mod.name, a2, b2, 1.0), kept
