from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank
from .base import Adapter, RankOptions, kaiming_, opt


@dataclass
class CoDyRAOptions(RankOptions):
    rank: int = opt(8, "Rank r each module starts with; pruning lowers it per module.", ge=1)
    kappa: float = opt(5e-3, "Weight of the sparsity term Σ|w_i| on the importance weights, as the proximal "
                             "threshold per step it reaches at the last step (it grows linearly from 0 "
                             "after the dense phase).", reg=True, ge=0)
    dense: float = opt(0.5, "Fraction of the steps trained before pruning starts.", ge=0, lt=1)


class CoDyRA(Adapter):
    """Dynamic rank-selective LoRA: ``ΔW = B diag(w) A``, with a trainable importance weight ``w_i``
    per rank component and a sparsity-promoting term ``κ Σ|w_i|`` that prunes components, so that
    each module ends with its own rank (the number of ``w_i ≠ 0``), set by how much the current data
    needs it. A starts kaiming-uniform, B at zero (ΔW = 0), w standard normal; there is no alpha
    scale (w carries the magnitude).

    The sparsity term is applied as its proximal step after each optimizer step (``after_step``):
    ``w ← sign(w) · max(|w| − κ_t, 0)``, soft-thresholding, which sets weights exactly to zero. A
    zeroed component drops out of ΔW exactly, and the exported rank of each module is the number of
    its components left.

    Choices where the paper leaves details open (followed from its reference code, github
    jeff024/codyra): the threshold is κ_t per step, not scaled by the learning rate; no pruning
    during the first ``dense`` fraction of the steps; then κ_t grows linearly to ``kappa`` at the
    last step (the reference code climbs 50 discrete levels to the same end). Its code thresholds in
    three passes, the last of which also zeroes the weights the first two shifted into (0, κ), so it
    prunes every |w| < 2κ; this uses the exact proximal operator of ``κ|w|`` instead. A pruned weight may come back if the gradient outgrows the
    threshold, as with any proximal gradient method; the reference code does not freeze it either.
    """

    name = "codyra"
    paper = ("Adaptive Rank, Reduced Forgetting: Continual Learning with Dynamic Rank-Selective LoRA "
             "(CoDyRA; Lu et al., 2024, arXiv:2412.01004)")
    Options = CoDyRAOptions

    def build(self) -> None:
        r = self.opts.rank
        self.A = nn.Parameter(torch.zeros(r, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, r))
        self.w = nn.Parameter(torch.zeros(r))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        kaiming_(self.A)
        self.B.zero_()
        self.w.normal_()

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.w)

    def rank_bound(self) -> int:
        """r (fewer per module after pruning)"""
        return self.opts.rank

    def threshold(self, step: int, total_steps: int) -> float:
        """κ_t after update ``step`` of ``total_steps``: 0 in the dense phase, then linear to ``kappa``."""
        start = self.opts.dense * total_steps
        if step <= start:
            return 0.0
        return self.opts.kappa * (step - start) / (total_steps - start)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        kappa = self.threshold(step, total_steps)
        if kappa > 0:
            self.w.copy_(self.w.sign() * (self.w.abs() - kappa).clamp_min(0))

    @property
    def active_rank(self) -> int:
        """Components not pruned (a module's exported rank, unless B or A lost rank too)."""
        return int((self.w != 0).sum())
