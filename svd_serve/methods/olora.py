from __future__ import annotations

from ..linalg import LowRank, leading_qr
from .residual import Residual


class OLoRA(Residual):
    """QR init: ``Q, R = qr(W)``, ``B0 = Q[:, :r]``, ``A0 = R[:r]``, base ← W − s·B0 A0 (only the r
    leading columns of Q and rows of R are computed: :func:`~svd_serve.linalg.leading_qr`)."""

    name = "olora"
    paper = "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models (Büyükakyüz, 2024, arXiv:2406.01775)"

    def components(self, weight, stat):
        q, r = leading_qr(weight, self.opts.rank)
        return LowRank(r, q)
