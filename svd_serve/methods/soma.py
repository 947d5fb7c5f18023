from __future__ import annotations

from dataclasses import dataclass

from .base import alpha_opt, rank_opt
from .milora import MiLoRA, MiLoRAOptions


@dataclass
class SoMAOptions(MiLoRAOptions):
    rank: int = rank_opt(16)
    alpha: float | None = alpha_opt(16.0)


class SoMA(MiLoRA):
    """MiLoRA-style minor-component init with SoMA's defaults (r = α = 16).

    The SoMA reference code's default ``niter`` path takes the TOP components through
    ``svd_lowrank``; svd-serve always takes the minor ones, as the paper describes.
    """

    name = "soma"
    paper = "SoMA: Singular Value Decomposed Minor Components Adaptation (github ysj9909/SoMA)"
    Options = SoMAOptions
    alpha_per_rank = 1.0
