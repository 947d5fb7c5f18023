from __future__ import annotations

from dataclasses import dataclass

from ..linalg import LowRank, top_svd
from .base import LoRAOptions, niter_opt
from .residual import Residual


@dataclass
class PiSSAOptions(LoRAOptions):
    niter: int | None = niter_opt()


class PiSSA(Residual):
    """Principal components: ``B0 A0`` = top-r SVD of W (scaled by 1/s), base ← W − s·B0 A0."""

    name = "pissa"
    paper = "PiSSA: Principal Singular Values and Singular Vectors Adaptation (Meng et al., 2024, arXiv:2404.02948)"
    Options = PiSSAOptions

    def components(self, weight, stat):
        u, s, vh = top_svd(weight, self.opts.rank, self.opts.niter)
        return LowRank.from_svd(u, s, vh, self.scale)
