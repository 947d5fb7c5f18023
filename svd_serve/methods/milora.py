from __future__ import annotations

import torch

from ..linalg import LowRank, minor_svd
from .residual import Residual


class MiLoRA(Residual):
    """Minor components: ``B0 A0`` = the r smallest singular triplets of W (scaled by 1/s)."""

    name = "milora"
    paper = "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning (Wang et al., 2024, arXiv:2406.09044)"

    def components(self, weight, cov):
        us, s, vh = minor_svd(weight, self.opts.rank)
        # U = US / S; a zero singular value gives a zero component
        u = us / torch.where(s > 0, s, torch.ones_like(s))
        return LowRank.from_svd(u, s, vh, self.scale)
