"""Factor-free adapter representation for the translator: a learned output basis per module.

LoRA factors are ambiguous (``B R, R^-1 A`` give the same update), so the translator never reads
``A``/``B`` directly. Per module ``m`` it owns a **translation basis** ``U_m`` ([out, k], orthonormal
columns) with weights ``sigma_m`` ([k]), learned from the training pairs: the top-k left singular
vectors of the stacked corrections ``[dW_safe_1 - dW_unsafe_1 | dW_safe_2 - dW_unsafe_2 | ...]``.
What the translator sees of an update ``dW``::

    e_j  = ||u_j^T dW||^2 / ||dW||_F^2      # share of the update written into direction j (k values)

plus ``sigma / sigma_1``, ``log1p(||dW||_F / sigma_1)``, module kind and depth. All of it depends on
``dW`` only. An edit shrinks the update along the basis, per direction::

    dW' = dW - U diag(g) U^T dW          (g_j in [0, g_max]; g_j > 1 reverses the component)
    B'  = s B - U diag(g) (U^T s B),  A' = A          # a LoRA of the same rank

Why this basis and not the alignment reference's: the first translator edited coordinates in the
alignment basis ``U_k^T dW Vh_k^T`` and left ASR at 99% on the lab's held-out experts, like SafeLoRA:
the compliance these experts learned is not where the alignment delta is. It is, however, written
into output directions that adapters of other seeds and domains share. A LoRA's update is roughly
the loss gradient (seed-independent output side) times the random ``A``'s row space (seed-dependent
input side), so only an output basis transfers to unseen adapters. Measured in the safety lab
(held-out-domain unsafe experts, seeds never seen): removing the update's component in the top 16
directions of the two training pairs' corrections (``g = 1``) took ASR from 99% to 21% at 92% domain
fidelity; ``g = 1.5`` to 0.8% at 73%. The experts learn per-direction ``g`` between those extremes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ...core.adapter import LoRAModule, layer_index, module_kind
from ...core.lowrank import frob2

MODULE_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModuleBasis:
    """Translation basis of one module: ``u`` [out, k] orthonormal columns, ``s`` [k] (>= 0, sorted)."""

    u: torch.Tensor
    s: torch.Tensor


def _lowrank_parts(mod: LoRAModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s B, A)`` in fp32."""
    return mod.scaled_b().float(), mod.lora_a.float()


def fit_basis(pairs: Sequence[tuple[LoRAModule, LoRAModule]], k: int) -> ModuleBasis:
    """Top-k left singular vectors of ``[dW_s1 - dW_u1 | dW_s2 - dW_u2 | ...]`` (zero-padded to k).

    Each correction ``D_p = L_p R_p`` with ``L_p = [sB_s, -sB_u]``, ``R_p = [A_s; A_u]``. With
    ``R_p^T = Q_p T_p`` (QR), ``D_p D_p^T = (L_p T_p^T)(L_p T_p^T)^T``, so the SVD of the small
    ``[L_1 T_1^T | L_2 T_2^T | ...]`` ([out, 2 r P]) gives the same left vectors and singular values.
    """
    cols = []
    for unsafe, safe in pairs:
        bu, au = _lowrank_parts(unsafe)
        bs, as_ = _lowrank_parts(safe)
        left = torch.cat([bs, -bu], 1)
        _, t = torch.linalg.qr(torch.cat([as_, au], 0).T)
        cols.append(left @ t.T)
    u, s, _ = torch.linalg.svd(torch.cat(cols, 1), full_matrices=False)
    kk = min(k, int(s.numel()))
    u, s = u[:, :kk], s[:kk]
    if kk < k:
        u = torch.cat([u, u.new_zeros(u.shape[0], k - kk)], 1)
        s = torch.cat([s, s.new_zeros(k - kk)])
    return ModuleBasis(u.contiguous(), s.contiguous())


def directional_rows(mod: LoRAModule, basis: ModuleBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U^T s B [k, r], A [r, in])``: row j of their product is ``u_j^T dW``."""
    b, a = _lowrank_parts(mod)
    return basis.u.T @ b, a


@dataclass
class ModuleView:
    """What the translator sees of one module (all sizes fixed by ``k``)."""

    energy: torch.Tensor  # [k] e_j = ||u_j^T dW||^2 / ||dW||^2
    sv: torch.Tensor  # [k]  sigma / sigma_1
    log_norm: float  # log1p(||dW||_F / sigma_1)
    kind: int  # index into MODULE_KINDS (len = unknown)
    layer_frac: float  # layer / (n_layers - 1)

    def features(self) -> torch.Tensor:
        """Flat feature vector: energy shares, basis spectrum, size, depth, kind one-hot."""
        kind = torch.zeros(len(MODULE_KINDS) + 1)
        kind[self.kind] = 1.0
        scalars = torch.tensor([self.log_norm, self.layer_frac])
        return torch.cat([self.energy, self.sv, scalars, kind])


def feature_dim(k: int) -> int:
    return 2 * k + 2 + len(MODULE_KINDS) + 1


def direction_energy(mod: LoRAModule, basis: ModuleBasis) -> tuple[torch.Tensor, float]:
    """``(||u_j^T dW||^2 for each j [k], ||dW||_F^2)``."""
    ub, a = directional_rows(mod, basis)
    per = ((ub @ (a @ a.T)) * ub).sum(1)  # diag(UB A A^T B^T U) = row norms^2 of U^T dW
    return per.clamp_min(0.0), float(frob2(*_lowrank_parts(mod)))


def view_module(mod: LoRAModule, basis: ModuleBasis, n_layers: int) -> ModuleView:
    per, total = direction_energy(mod, basis)
    s1 = float(basis.s[0]) if float(basis.s[0]) > 0 else 1.0
    kind = module_kind(mod.name)
    layer = layer_index(mod.name) or 0
    return ModuleView(
        energy=per / total if total > 0 else torch.zeros_like(per),
        sv=basis.s / s1,
        log_norm=float(torch.tensor(total).sqrt().div(s1).log1p()),
        kind=MODULE_KINDS.index(kind) if kind in MODULE_KINDS else len(MODULE_KINDS),
        layer_frac=layer / max(n_layers - 1, 1),
    )


def optimal_shrink(unsafe: LoRAModule, safe: LoRAModule, basis: ModuleBasis) -> torch.Tensor:
    """Per direction, the ``g`` that brings ``(1 - g) u_j^T dW_u`` closest to ``u_j^T dW_s`` ([k]).

    ``g*_j = 1 - <a_j, b_j> / ||a_j||^2`` with ``a_j = u_j^T dW_u``, ``b_j = u_j^T dW_s``; 0 where the
    unsafe update has nothing in direction j.
    """
    ub_u, a_u = directional_rows(unsafe, basis)
    ub_s, a_s = directional_rows(safe, basis)
    cross = ((ub_u @ (a_u @ a_s.T)) * ub_s).sum(1)
    norm2 = ((ub_u @ (a_u @ a_u.T)) * ub_u).sum(1)
    g = torch.where(norm2 > 0, 1.0 - cross / norm2.clamp_min(1e-30), torch.zeros_like(norm2))
    return g


def apply_shrink(mod: LoRAModule, basis: ModuleBasis, g: torch.Tensor) -> tuple[LoRAModule, float]:
    """``dW' = dW - U diag(g) U^T dW`` as LoRA factors of the same rank; returns it and
    ``||dW'||^2 / ||dW||^2``."""
    b, a = _lowrank_parts(mod)
    b_new = b - basis.u @ (g[:, None] * (basis.u.T @ b))
    total = float(frob2(b, a))
    kept = float(frob2(b_new, a)) / total if total > 0 else 1.0
    return LoRAModule(mod.name, mod.lora_a.float().clone(), b_new, 1.0), kept


def n_layers_of(names: Mapping[str, object] | Sequence[str]) -> int:
    layers = [layer_index(n) for n in names]
    return max((x for x in layers if x is not None), default=0) + 1
