from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank, top_svd
from .base import Adapter, RankOptions, niter_opt


@dataclass
class SVFitOptions(RankOptions):
    niter: int | None = niter_opt()


class SVFit(Adapter):
    """Train only the r largest singular values: ``W = U_r diag(σ) V_rᵀ + W_e``, σ trainable,
    ``ΔW = U_r diag(σ − σ0) V_rᵀ``, rank ≤ r. Follows the paper; no public code was found."""

    name = "svfit"
    paper = "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values (Sun et al., 2024, arXiv:2409.05926)"
    Options = SVFitOptions

    def svd_rank(self) -> int:
        return self.opts.rank

    def svd(self, weight):
        """The ``svd_rank()`` largest singular triplets of the base weight."""
        return top_svd(weight, self.svd_rank(), self.opts.niter)

    def build(self) -> None:
        r = self.svd_rank()
        self.sigma = nn.Parameter(torch.zeros(r))
        self.register_buffer("sigma0", torch.zeros(r))
        self.register_buffer("U", torch.zeros(self.m, r))
        self.register_buffer("Vh", torch.zeros(r, self.n))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        u, s, vh = self.svd(weight)
        self.U.copy_(u)
        self.Vh.copy_(vh)
        self.sigma.copy_(s)
        self.sigma0.copy_(s)

    def trainable_factors(self) -> LowRank:
        return LowRank(self.Vh, self.U * (self.sigma - self.sigma0))

    def rank_bound(self) -> int:
        """r"""
        return self.svd_rank()
