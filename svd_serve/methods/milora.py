from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LowRank
from .minor import MinorOptions, MinorSelection
from .residual import Residual


@dataclass
class MiLoRAOptions(MinorOptions):
    pass


class MiLoRA(MinorSelection, Residual):
    """Minor components: ``B0 A0`` = the r smallest singular triplets of W (scaled by 1/s). With
    ``-o select=activation``: the rank-r part of W of least output energy on the calibration inputs
    (``methods/minor.py``)."""

    name = "milora"
    paper = "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning (Wang et al., 2024, arXiv:2406.09044)"
    Options = MiLoRAOptions

    def components(self, weight, stat):
        us, s, vh = self.minor(weight, stat)
        # U = US / S; a zero singular value gives a zero component
        u = us / torch.where(s > 0, s, torch.ones_like(s))
        return LowRank.from_svd(u, s, vh, self.scale)
