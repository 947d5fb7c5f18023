from __future__ import annotations

import torch
from torch import nn

from ..linalg import LowRank
from .base import Adapter, kaiming_


class LoRA(Adapter):
    """``ΔW = s·B A``, A kaiming-uniform, B = 0."""

    name = "lora"
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685)"

    def build(self) -> None:
        self.A = nn.Parameter(torch.zeros(self.opts.rank, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, self.opts.rank))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        kaiming_(self.A)
        self.B.zero_()

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.scale)

    def rank_bound(self) -> int:
        """r"""
        return self.opts.rank
