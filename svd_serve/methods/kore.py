from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SvdServeError
from ..linalg import LowRank
from .base import LoRAOptions, opt
from .residual import Residual


@dataclass
class KOREOptions(LoRAOptions):
    freeze_a: bool = opt(False, "Train only B (KORE v2): ΔW = s·(B − B0) A0, rank ≤ r, and A stays in the null space.")


class KORE(Residual):
    """Null-space init (KORE / LoRA-Null). With C the input covariance over calibration data of the
    knowledge to keep, N = eigenvectors of C with the r smallest eigenvalues, ``W_null = W N Nᵀ``
    (rank ≤ r), ``s·B0 A0 = W_null`` from its SVD, base ← W − W_null. The rows of A0 lie in the
    approximate null space of the calibration inputs."""

    name = "kore"
    paper = "KORE: Enhancing Knowledge Injection via Knowledge-Oriented Constraints (github KORE-LMM/KORE); LoRA-Null (github HungerPWAY/LoRA-Null)"
    Options = KOREOptions
    needs_calibration = True

    def build(self) -> None:
        super().build()
        if self.opts.freeze_a:
            del self.A
            self.register_buffer("A", torch.zeros(self.opts.rank, self.n))

    def components(self, weight, stat):
        if stat is None:
            raise SvdServeError(f"{self.name} needs calibration data (--calib-data)")
        r = self.opts.rank
        _, evecs = torch.linalg.eigh(stat.double())
        null = evecs[:, :r].float()  # [n, r], smallest eigenvalues
        u, s, qh = torch.linalg.svd(weight @ null, full_matrices=False)  # W N = U S Qᵀ
        return LowRank.from_svd(u, s, qh @ null.T, self.scale)  # W N Nᵀ = U S (N Q)ᵀ

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.scale)

    def rank_bound(self) -> int:
        """2r (r with freeze_a)"""
        return self.opts.rank if self.opts.freeze_a else 2 * self.opts.rank
