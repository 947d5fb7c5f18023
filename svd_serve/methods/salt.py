from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SvdServeError
from ..linalg import LowRank
from .base import Adapter, RankOptions, kaiming_, opt


@dataclass
class SALTOptions(RankOptions):
    ratio: float = opt(0.1, "Fraction of the k singular values that get a trainable scale and shift "
                            "(k_s = max(1, ⌊k·ratio⌋)); rank is the rank of the LoRA on the tail.", gt=0, lt=1)
    reg: float = opt(0.0, "Weight of ‖Σ'_top − Σ_top‖_F + ‖XY‖_F (off by default, as in the paper's code).",
                     reg=True, ge=0)


class SALT(Adapter):
    """Scale-and-shift of the top k_s singular values plus a rank-r LoRA ``X Y`` on the tail block:

        W' = U_top diag(ReLU(a·σ + b)) V_topᵀ + U_tail (Σ_tail + X Y) V_tailᵀ
        ΔW = U_top diag(ReLU(a·σ + b) − σ) V_topᵀ + (U_tail X)(Y V_tailᵀ)     rank ≤ k_s + r

    The ReLU acts on the (diagonal) top singular values only, keeping them non-negative; applying it
    to the whole non-diagonal tail block would make ΔW full-rank and inexact as LoRA, so it is not.
    """

    name = "salt"
    paper = "SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., 2025; github BioMedIA-MBZUAI/SALT)"
    Options = SALTOptions

    @property
    def ks(self) -> int:
        """How many top singular values get a scale and shift."""
        return max(1, int(self.k * self.opts.ratio))

    def check(self) -> None:
        if not self.opts.rank < self.k - self.ks:
            raise SvdServeError(f"salt: rank {self.opts.rank} must be below the tail size k - k_s = "
                                f"{self.k - self.ks} for a {self.m}x{self.n} layer")

    def build(self) -> None:
        k, r = self.k, self.opts.rank
        tail = k - self.ks
        self.scale_a = nn.Parameter(torch.ones(self.ks))
        self.shift_b = nn.Parameter(torch.zeros(self.ks))
        self.X = nn.Parameter(torch.zeros(tail, r))
        self.Y = nn.Parameter(torch.zeros(r, tail))
        self.register_buffer("U", torch.zeros(self.m, k))
        self.register_buffer("S", torch.zeros(k))
        self.register_buffer("Vh", torch.zeros(k, self.n))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        self.U.copy_(u)
        self.S.copy_(s)
        self.Vh.copy_(vh)
        self.scale_a.fill_(1.0)
        self.shift_b.zero_()
        kaiming_(self.X)
        self.Y.zero_()

    def top_delta(self):
        s = self.S[: self.ks]
        return F.relu(self.scale_a * s + self.shift_b) - s

    def trainable_factors(self) -> LowRank:
        ks = self.ks
        a = torch.cat([self.Vh[:ks], self.Y @ self.Vh[ks:]])
        b = torch.cat([self.U[:, :ks] * self.top_delta(), self.U[:, ks:] @ self.X], dim=1)
        return LowRank(a, b)

    def regularizer(self):
        if self.opts.reg == 0:
            return None
        return self.opts.reg * (torch.linalg.norm(self.top_delta()) + torch.linalg.norm(self.X @ self.Y))

    def rank_bound(self) -> int:
        """k_s + r"""
        return self.ks + self.opts.rank
