from __future__ import annotations

import torch

from ..linalg import LowRank
from .residual import Residual


class OLoRA(Residual):
    """QR init: ``Q, R = qr(W)``, ``B0 = Q[:, :r]``, ``A0 = R[:r]``, base ← W − s·B0 A0."""

    name = "olora"
    paper = "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models (Büyükakyüz, 2024, arXiv:2406.01775)"

    def components(self, weight, cov):
        q, r = torch.linalg.qr(weight)
        return LowRank(r[: self.opts.rank], q[:, : self.opts.rank])
