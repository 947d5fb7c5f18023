from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank
from .base import Adapter, kaiming_, opt, orthogonality
from .minor import SELECT, MinorOptions, MinorSelection


@dataclass
class KaSAOptions(MinorOptions):
    select: str | None = opt(None, "Which rank-r part of W is dropped: weight = its r smallest singular components "
                                   "(the paper); activation = the part of least output energy on the calibration "
                                   "inputs of --calib-data (see linalg.output_minor); none (the default) = activation "
                                   "on the calibration inputs at hand (`svd-serve train`: --calib-data, else up to "
                                   "128 of its training rows), weight where there are none.", choices=SELECT)
    beta: float = opt(1e-4, "Weight of the singular-value penalty Σ d².", reg=True, ge=0)
    gamma: float = opt(1e-3, "Weight of the orthogonality penalty ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (r×r Grams, as HF PEFT).",
                       reg=True, ge=0)


class KaSA(MinorSelection, Adapter):
    """Knowledge-aware singular-value adaptation.

    The base loses its r smallest singular components ``U_t σ_t V_tᵀ`` (kept here as frozen factors),
    and the update is ``s·B diag(d) A`` (A kaiming, B = 0, d ~ N(0, 1)):

        ΔW = s·B diag(d) A − U_t diag(σ_t) V_tᵀ        rank ≤ 2r

    The minor components come from ``eigh`` of the k×k Gram matrix in float64, not a full SVD.
    Truncation uses ``k = min(m, n)`` (the official code's ``in_features − r`` drops nothing when
    out < in). The regularizer is averaged over layers, as in the official trainer. With
    ``-o select=activation`` the dropped part is the rank-r part of least output energy on the
    calibration inputs instead (``methods/minor.py``); ΔW stays exact and of rank ≤ 2r. The default,
    ``select=none``, is activation wherever calibration inputs are at hand (``svd-serve train`` always
    has them: --calib-data, else the training rows), since the published choice breaks real models
    before the first step (the init health check refuses it); ``-o select=weight`` is the paper's KaSA.
    """

    name = "kasa"
    paper = "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models (Wang et al., 2024, arXiv:2412.06071)"
    Options = KaSAOptions

    def build(self) -> None:
        r = self.opts.rank
        self.A = nn.Parameter(torch.zeros(r, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, r))
        self.d = nn.Parameter(torch.zeros(r))
        self.register_buffer("dropped_us", torch.zeros(self.m, r))  # U_t diag(σ_t)
        self.register_buffer("dropped_vh", torch.zeros(r, self.n))  # V_tᵀ

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        us, _, vh = self.minor(weight, stat)
        self.dropped_us.copy_(us)
        self.dropped_vh.copy_(vh)
        kaiming_(self.A)
        self.B.zero_()
        self.d.normal_()

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * (self.d * self.scale))

    def frozen_factors(self) -> LowRank:
        return LowRank(self.dropped_vh, -self.dropped_us)

    def regularizer(self):
        return self.opts.beta * self.d.square().sum() + self.opts.gamma * orthogonality(self.A, self.B)
