"""Which minor components a method takes (KaSA drops them, MiLoRA and SoMA train them).

``select=weight`` (the papers' choice): the r smallest singular components of W. ``select=activation``:
the rank-r part of W with the least output energy on calibration inputs (``linalg.output_minor``).
Singular values say nothing about how much of a layer's output a component carries: in a layer with a
flat spectrum the smallest ones can carry a large share of it on real inputs (see the README,
"Initialisation health check"), and dropping them breaks the model before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import SvdServeError
from ..linalg import damped, minor_svd
from .base import LoRAOptions, opt

SELECT = ("weight", "activation")


@dataclass
class MinorOptions(LoRAOptions):
    select: str = opt("weight", "Which rank-r part of W: weight = its r smallest singular components (the "
                                "papers); activation = the part of least output energy on the calibration "
                                "inputs of --calib-data (see linalg.output_minor).", choices=SELECT)
    damp: float = opt(0.01, "With select=activation: the input covariance is C + damp·mean(diag C)·I, which "
                            "prefers the plain minor components among directions the calibration data hardly "
                            "excites (linalg.damped).", ge=0)


class MinorSelection:
    """Mixin for an :class:`~svd_serve.methods.base.Adapter` whose options are :class:`MinorOptions`."""

    @classmethod
    def needs_calibration_for(cls, opts) -> bool:
        return opts.select == "activation" or super().needs_calibration_for(opts)

    @classmethod
    def uses_calibration_for(cls, opts) -> bool:
        return opts.select is None or super().uses_calibration_for(opts)

    def minor(self, weight: Tensor, cov: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(US, S, Vh)`` of the rank-r part of ``weight`` the options select (``linalg.minor_svd``);
        ``select=none``: activation with an input covariance ``cov``, weight without."""
        opts = self.opts
        select = opts.select or ("weight" if cov is None else "activation")
        if select == "weight":
            return minor_svd(weight, opts.rank)
        if cov is None:
            raise SvdServeError(f"{self.name} with select=activation needs calibration data (--calib-data)")
        return minor_svd(weight, opts.rank, damped(cov, opts.damp))
