from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SvdServeError
from ..linalg import LowRank, damped, exact_svd
from .base import LoRAOptions, opt
from .residual import Residual


@dataclass
class CorDAOptions(LoRAOptions):
    damp: float = opt(0.01, "Initial damping δ of C + δ·mean(diag C)·I; doubled until ‖C C⁻¹ − I‖_F < 0.05.", gt=0)


def damped_inverse(cov: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C + δ·mean(diag C)·I, its inverse)`` with δ doubled until the inverse is accurate."""
    cov = cov.float()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    while True:
        fixed = damped(cov, damp).float()
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye) < 0.05:
            return fixed, inv
        damp *= 2


class CorDA(Residual):
    """Context-oriented decomposition: SVD of ``W C`` (C = input covariance over calibration data),
    ``W = U Σ (Ṽᵀ C⁻¹)``. IPA (instruction-previewed) takes the first r triplets, KPA
    (knowledge-preserved) the last r. ``B0 = U_r √(σ_r/s)``, ``A0 = √(σ_r/s) V_rᵀ``.
    The scale s follows HF PEFT (the official code has none)."""

    name = "corda"
    paper = "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models (Yang et al., 2024, arXiv:2406.05223)"
    Options = CorDAOptions
    needs_calibration = True
    mode = "ipa"

    def components(self, weight, stat):
        if stat is None:
            raise SvdServeError(f"{self.name} needs calibration data (--calib-data)")
        fixed, inv = damped_inverse(stat, self.opts.damp)
        r, k = self.opts.rank, self.k
        # only the r triplets used, from the Gram matrix of W C in float64 (not a full SVD)
        u, s, vh = exact_svd(weight.double() @ fixed.double(), slice(k - r, k) if self.mode == "ipa" else slice(0, r))
        return LowRank.from_svd(u, s, vh @ inv.double(), self.scale).float()


class CorDAIPA(CorDA):
    name = "corda-ipa"
    mode = "ipa"


class CorDAKPA(CorDA):
    name = "corda-kpa"
    mode = "kpa"
