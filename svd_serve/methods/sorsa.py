from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank, top_svd
from .base import Adapter, RankOptions, niter_opt, opt, orthogonality


@dataclass
class SORSAOptions(RankOptions):
    gamma: float = opt(4e-4, "Weight of ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (mean over layers), added to the loss (the "
                             "official trainer applies its gradient scaled by γ/lr after clipping).", reg=True, ge=0)
    niter: int | None = niter_opt()


class SORSA(Adapter):
    """Orthonormal singular vectors: ``B = U_r``, ``S = σ_r``, ``A = V_rᵀ`` all trainable, the base
    keeps ``W − U_r diag(σ_r) V_rᵀ``. ΔW = B diag(S) A − B0 diag(S0) A0 (no alpha scale)."""

    name = "sorsa"
    paper = "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of LLMs (Cao, 2024, arXiv:2409.00055)"
    Options = SORSAOptions

    def build(self) -> None:
        r = self.opts.rank
        self.A = nn.Parameter(torch.zeros(r, self.n))
        self.S = nn.Parameter(torch.zeros(r))
        self.B = nn.Parameter(torch.zeros(self.m, r))
        self.register_buffer("A0", torch.zeros(r, self.n))
        self.register_buffer("S0", torch.zeros(r))
        self.register_buffer("B0", torch.zeros(self.m, r))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        u, s, vh = top_svd(weight, self.opts.rank, self.opts.niter)
        for p, p0, v in ((self.A, self.A0, vh), (self.S, self.S0, s), (self.B, self.B0, u)):
            p.copy_(v)
            p0.copy_(v)

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.S)

    def frozen_factors(self) -> LowRank:
        return LowRank(self.A0, self.B0 * -self.S0)

    def regularizer(self):
        return self.opts.gamma * orthogonality(self.A, self.B)
