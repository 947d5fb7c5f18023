"""Shared shape of the "residual base" methods (PiSSA, MiLoRA, OLoRA, CorDA, KORE, SoMA).

They take a rank-r piece ``s·B0 A0`` out of the base and train ``A, B`` starting from ``A0, B0``:

    W_adapted = (W − s·B0 A0) + s·B A        ΔW = s·(B A − B0 A0)      rank ≤ 2r

``W`` itself is never modified: the frozen ``−s·B0 A0`` is a second low-rank term, which keeps
ΔW exact against the original base whatever the base dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..linalg import LowRank
from .base import Adapter


class Residual(Adapter):
    def build(self) -> None:
        r = self.opts.rank
        self.A = nn.Parameter(torch.zeros(r, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, r))
        self.register_buffer("A0", torch.zeros(r, self.n))
        self.register_buffer("B0", torch.zeros(self.m, r))

    def components(self, weight: Tensor, stat: Tensor | None) -> LowRank:
        """``(A0 [r, n], B0 [m, r])`` with ``s·B0 A0`` the piece taken out of the base."""
        raise NotImplementedError

    @torch.no_grad()
    def init(self, weight: Tensor, stat: Tensor | None = None) -> None:
        a0, b0 = self.components(weight.float(), stat)
        self.A0.copy_(a0)
        self.B0.copy_(b0)
        self.A.copy_(a0)
        self.B.copy_(b0)

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.scale)

    def frozen_factors(self) -> LowRank:
        return LowRank(self.A0, self.B0 * -self.scale)

