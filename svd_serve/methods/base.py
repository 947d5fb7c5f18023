"""What every adapter method is: options, init from a base weight, forward, regularizer, delta.

One ``Adapter`` instance sits beside one ``nn.Linear`` (weight ``W [m, n] = [out, in]``) and adds
its correction to the base output. The whole design rests on one rule: at every moment the adapted
layer computes ``(W + ΔW) x`` where ``ΔW = B @ A`` is available in low-rank form through
:meth:`Adapter.delta`, against the ORIGINAL ``W``. Methods that "rewrite the base" (PiSSA's residual,
KaSA's truncation) express that rewrite as a frozen low-rank term instead of touching ``W``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import SvdServeError
from ..linalg import LowRank


@dataclass
class Options:
    """Options every method has. ``alpha=None`` means the method's default (``alpha_per_rank · rank``)."""

    rank: int = 8
    alpha: float | None = None


class Adapter(nn.Module):
    """Base class of a method. Subclasses set the class attributes and implement ``build``/``init``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Options: ClassVar[type] = Options
    alpha_per_rank: ClassVar[float] = 2.0
    needs_calibration: ClassVar[bool] = False
    uses_rank: ClassVar[bool] = True

    def __init__(self, out_features: int, in_features: int, opts: Options):
        super().__init__()
        self.m, self.n, self.opts = out_features, in_features, opts
        self.k = min(out_features, in_features)
        if self.uses_rank and not 0 < opts.rank < self.k:
            raise SvdServeError(
                f"{self.name}: rank {opts.rank} must be in [1, min(out, in) - 1] = [1, {self.k - 1}] "
                f"for a {out_features}x{in_features} layer")
        self.build()

    # --- to implement -------------------------------------------------------------------------
    def build(self) -> None:
        """Allocate parameters (trainable) and buffers (frozen), values not yet meaningful."""
        raise NotImplementedError

    @torch.no_grad()
    def init(self, weight: Tensor, cov: Tensor | None = None) -> None:
        """Set every tensor from the base weight (float32 ``[m, n]``) and, if needed, the
        calibration input covariance ``cov [n, n]`` (float64)."""
        raise NotImplementedError

    def trainable_factors(self) -> LowRank:
        """The part of ΔW that depends on trainable parameters, differentiable, scale included."""
        raise NotImplementedError

    def frozen_factors(self) -> LowRank | None:
        """The constant part of ΔW (a residual base, dropped components), or None."""
        return None

    def regularizer(self) -> Tensor | None:
        """This layer's weighted regularization term (coefficients from the options), or None."""
        return None

    def rank_bound(self) -> int:
        """Largest possible rank of ΔW."""
        return 2 * self.opts.rank

    @classmethod
    def needs_calibration_for(cls, opts) -> bool:
        """Whether :meth:`init` needs the calibration covariance with these options."""
        return cls.needs_calibration

    # --- shared ----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        alpha = self.opts.alpha if self.opts.alpha is not None else self.alpha_per_rank * self.opts.rank
        return alpha / self.opts.rank

    def forward(self, x: Tensor) -> Tensor:
        """The correction ``ΔW x`` (the wrapper adds it to the base output)."""
        trainable = self.trainable_factors()
        xa = x.to(trainable.A.dtype)
        out = trainable.apply(xa)
        frozen = self.frozen_factors()
        if frozen is not None:
            out = out + frozen.apply(xa)
        return out.to(x.dtype)

    @torch.no_grad()
    def delta(self) -> LowRank:
        """Exact factors ``(A, B)`` of ``W_adapted − W_original`` (rank ≤ :meth:`rank_bound`)."""
        trainable, frozen = self.trainable_factors(), self.frozen_factors()
        return (LowRank.cat([trainable, frozen]) if frozen is not None else trainable).float()


def kaiming_(t: Tensor) -> Tensor:
    """LoRA's A init: kaiming-uniform with a = √5, as ``nn.Linear`` does."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def orthogonality(a: Tensor, b: Tensor) -> Tensor:
    """``‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F`` with the r×r Gram matrices."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)


def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}
