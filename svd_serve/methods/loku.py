from __future__ import annotations

from dataclasses import dataclass

from ..errors import SvdServeError
from ..linalg import DAMP, LowRank, Weighting, top_svd
from .base import LoRAOptions, niter_opt, opt
from .residual import Residual


@dataclass
class LoKUOptions(LoRAOptions):
    damp: float = opt(DAMP, "Row weights √(I + damp·mean(I)): keeps rows the Fisher information misses invertible.",
                      gt=0)
    niter: int | None = niter_opt()


class LoKU(Residual):
    """FILA, LoKU's adapter init: the rank-r approximation of W that is best in the norm weighted by the
    Fisher information of the data to forget, ``min ‖D (W − s·B0 A0)‖_F`` with ``D = diag(√I)`` and
    ``I`` the Fisher information of each output row (relative to the retain data's in an unlearning
    run with ``--retain-data``): the top-r SVD of ``D W`` = ``U Σ Vᵀ``, ``B0 = D⁻¹ U √(Σ/s)``,
    ``A0 = √(Σ/s) Vᵀ``; base ← W − s·B0 A0. The adapter starts on the weights that carry the forget
    set. Train it with the unlearning objective (``svd-serve train --forget-data``)."""

    name = "loku"
    paper = ("Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs (LoKU: inverted hinge loss "
             "+ FILA; Cha et al., ICLR 2025, arXiv:2408.06621)")
    Options = LoKUOptions
    needs_calibration = True
    statistic = "fisher"

    def components(self, weight, stat):
        if stat is None:
            raise SvdServeError(f"{self.name} needs calibration data (--calib-data or --forget-data)")
        rows = Weighting.fisher(stat, self.opts.damp)
        u, s, vh = top_svd(rows.rows[:, None].float() * weight, self.opts.rank, self.opts.niter)
        a0, b0 = rows.unweigh(LowRank.from_svd(u, s, vh, self.scale))
        return LowRank(a0.float(), b0.float())
