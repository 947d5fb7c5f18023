from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank, top_svd
from .base import Adapter, Options, opt


@dataclass
class OSFTOptions(Options):
    energy: float = opt(0.9, "Share of ‖W‖²_F held by the kept top singular components of each weight: "
                             "k_high is the fewest that reach it (at most k − 1); the rest is trained.",
                        gt=0, lt=1)


class OSFT(Adapter):
    """Orthogonal subspace fine-tuning ("Sculpting Subspaces"): constrained full fine-tuning that
    keeps each weight's high-energy singular subspace. With ``W = U Σ Vᵀ`` (all k = min(m, n)
    triplets), the top ``k_high`` triplets are frozen and the other ``k_low = k − k_high`` are trained,
    ``U_low``, ``Σ_low`` and ``V_low``, their updates kept orthogonal to the frozen subspace:

        ∇U_low ← ∇U_low − U_high U_highᵀ ∇U_low        ∇V_low ← ∇V_low − V_high V_highᵀ ∇V_low
        W' = U_high Σ_high V_highᵀ + U_low Σ_low V_lowᵀ
        ΔW = U_low Σ_low V_lowᵀ − U_low⁰ Σ_low⁰ V_low⁰ᵀ,    U_highᵀ ΔW = 0,  ΔW V_high = 0

    so ΔW maps into the orthogonal complement of U_high from that of V_high: rank ≤ k_low, which is
    most of k (full rank in practice).

    The projections are part of the forward pass: :meth:`trainable_factors` uses ``P_U U_low`` and
    ``V_lowᵀ P_V`` (``P = I − U_high U_highᵀ``, factored, no m×m matrix), so autograd gives the
    projected gradients above and ΔW stays exactly in the complement whatever the optimizer does.
    This equals the paper's gradient projection followed by its parameter projection after each step
    (which the authors' code adds because Adam's per-entry scaling rotates a projected gradient out of
    the subspace): the same effective weights, with the same Adam moments, for any weight decay 0.

    Choices: the paper sets each layer's kept rank from an importance score (cosine similarity of the
    layer's inputs and outputs over data) between a minimum and a target ratio; a method here sees one
    weight at a time, so ``k_high`` is adaptive per weight by spectral energy instead (on
    SmolLM2-135M, energy 0.9 keeps 12–79 % of each q/v weight's components, 51 % on average, where the
    authors' code defaults to a fixed half). At least one component is always trained.

    Memory: U, Σ, V of each target, trainable and at init (about 2·(m·k + k·n) values, plus Adam's
    state), like full fine-tuning of those modules.
    """

    name = "osft"
    paper = ("Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning "
             "(OSFT; Nayak et al., 2025, arXiv:2504.07097)")
    Options = OSFTOptions
    full_rank = True

    def build(self) -> None:
        m, n, k = self.m, self.n, self.k
        self.U = nn.Parameter(torch.zeros(m, k))
        self.S = nn.Parameter(torch.zeros(k))
        self.Vh = nn.Parameter(torch.zeros(k, n))
        self.register_buffer("U0", torch.zeros(m, k))
        self.register_buffer("S0", torch.zeros(k))
        self.register_buffer("Vh0", torch.zeros(k, n))
        self.register_buffer("high", torch.zeros((), dtype=torch.long))  # k_high

    @staticmethod
    def kept(s: torch.Tensor, energy: float) -> int:
        """The fewest top components whose σ² sum reaches ``energy`` of the total (at most k − 1)."""
        power = s.double().square()
        total = float(power.sum())
        if total == 0:
            return 0
        reached = int((power.cumsum(0) < energy * total).sum()) + 1
        return min(reached, len(s) - 1)

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        u, s, vh = top_svd(weight, self.k)
        for p, p0, value in ((self.U, self.U0, u), (self.S, self.S0, s), (self.Vh, self.Vh0, vh)):
            p.copy_(value)
            p0.copy_(value)
        self.high.fill_(self.kept(s, self.opts.energy))

    def low(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRank:
        """``P_U U_low diag(S_low) V_lowᵀ P_V`` from full-size factors: their low part, projected."""
        kh = int(self.high)
        u_high, vh_high = self.U0[:, :kh], self.Vh0[:kh]
        u, vh = u[:, kh:], vh[kh:]
        u = u - u_high @ (u_high.T @ u)
        vh = vh - (vh @ vh_high.T) @ vh_high
        return LowRank(vh, u * s[kh:])

    def trainable_factors(self) -> LowRank:
        return self.low(self.U, self.S, self.Vh)

    def frozen_factors(self) -> LowRank:
        """The initial low part, projected the same way (so that ΔW lies in the complement to the
        last digit, not only to the orthogonality of the SVD)."""
        return self.low(self.U0, -self.S0, self.Vh0)

    def rank_bound(self) -> int:
        """k − k_high (k_high: the top components holding `energy` of ‖W‖²)"""
        return self.k - int(self.high)
