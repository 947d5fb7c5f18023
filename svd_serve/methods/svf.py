from __future__ import annotations

from ..linalg import top_svd
from .base import Options
from .svfit import SVFit


class SVF(SVFit):
    """All k = min(m, n) singular values trainable, U and V frozen (CLIP-SVD):
    ``ΔW = U diag(σ' − σ) Vᵀ``, rank ≤ k. It has no options (no rank, no scale). Exported exactly at
    rank k, or at a lower ``--max-rank`` by keeping the largest ``|σ' − σ|`` (error = ‖rest of Δσ‖₂ /
    ‖Δσ‖₂).
    Works for any k (the reference code silently truncates when k is not divisible by 4)."""

    name = "svf"
    paper = "Singular Value Few-shot Adaptation of Vision-Language Models (CLIP-SVD; github HealthX-Lab/CLIP-SVD)"
    Options = Options

    def svd_rank(self) -> int:
        return self.k

    def rank_bound(self) -> int:
        """min(out, in)"""
        return self.k

    def svd(self, weight):
        return top_svd(weight, self.k)
