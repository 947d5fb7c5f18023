"""Shared shape of the "residual base" methods (PiSSA, MiLoRA, OLoRA, CorDA, KORE, SoMA).

They take a rank-r piece ``s·B0 A0`` out of the base and train ``A, B`` starting from ``A0, B0``:

    W_adapted = (W − s·B0 A0) + s·B A        ΔW = s·(B A − B0 A0)      rank ≤ 2r

``W`` itself is never modified: the frozen ``−s·B0 A0`` is a second low-rank term, which keeps
ΔW exact against the original base whatever the base dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Factors


class Residual(Adapter):
    def build(self) -> None:
        r = self.opts.rank
        self.A = nn.Parameter(torch.zeros(r, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, r))
        self.register_buffer("A0", torch.zeros(r, self.n))
        self.register_buffer("B0", torch.zeros(self.m, r))

    def components(self, weight: Tensor, cov: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(B0 [m, r], A0 [r, n])`` with ``s·B0 A0`` the piece taken out of the base."""
        raise NotImplementedError

    @torch.no_grad()
    def init(self, weight: Tensor, cov: Tensor | None = None) -> None:
        b0, a0 = self.components(weight.float(), cov)
        self.A0.copy_(a0)
        self.B0.copy_(b0)
        self.A.copy_(a0)
        self.B.copy_(b0)

    def trainable_factors(self) -> Factors:
        return self.A, self.B * self.scale

    def frozen_factors(self) -> Factors:
        return self.A0, self.B0 * -self.scale


def split_sqrt(u: Tensor, s: Tensor, vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``U diag(S) Vh = scale · B0 A0`` with the singular values shared evenly: ``B0 = U√(S/scale)``."""
    root = (s / scale).sqrt()
    return u * root, root[:, None] * vh
