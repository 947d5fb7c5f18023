"""Decompositions the methods and exporters share.

Everything here works in float64 internally where accuracy matters and never forms a dense
``m x n`` product of factors unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def top_svd(w: Tensor, r: int, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``r`` largest singular triplets of ``w`` as ``(U [m,r], S [r], Vh [r,n])``, float32.

    ``niter=None`` is exact: ``eigh`` of the ``k x k`` Gram matrix in float64 (:func:`gram_components`),
    3-10x faster than ``torch.linalg.svd`` and more accurate than its float32 result. An integer runs
    randomized subspace iteration (Halko et al.) with ``niter`` power iterations on a
    ``max(2r, r + 8)``-column sketch. Its accuracy depends on how fast the spectrum decays; measured
    at ``niter=4`` (top ``r`` singular values, max relative error, ``tests/test_linalg.py``):
    ``σ_i ∝ 1/i`` within 1e-5, ``σ_i ∝ 1/√i`` within 2e-3, flatter spectra (``σ_i ∝ i^-0.25``) only
    within 1e-2 to 6e-2. Use ``niter=None`` when the exact values matter.
    """
    w = w.detach().float()
    if niter is None:
        k = min(w.shape)
        us, s, vh = gram_components(w, slice(k - r, k))
        u = us / torch.where(s > 0, s, torch.ones_like(s))  # a zero component keeps U = 0
        return u.float().contiguous(), s.float(), vh.float().contiguous()
    q = min(max(2 * r, r + 8), min(w.shape))
    u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].T.contiguous()


def gram_components(w: Tensor, which: slice) -> tuple[Tensor, Tensor, Tensor]:
    """Singular triplets of ``w`` picked by position in ASCENDING order of singular value (``which``
    indexes the ``k = min(m, n)`` of them), from ``eigh`` of the ``k x k`` Gram matrix in float64.

    Returned in float64 as ``(US [m,r], S [r], Vh [r,n])`` sorted by descending singular value, where
    ``US = U diag(S)`` is computed as ``W V`` (for ``m >= n``; ``Uᵀ W`` is split for ``m < n``) so that
    ``US @ Vh`` is the exact projection of ``W`` on the chosen subspace even when some singular values
    are zero (their ``US`` is zero and their ``Vh`` row any unit vector).
    """
    w64 = w.detach().double()
    m, n = w64.shape
    evals, evecs = torch.linalg.eigh(w64.T @ w64 if m >= n else w64 @ w64.T)  # ascending
    vecs = evecs[:, which].flip(-1)
    s = evals[which].flip(-1).clamp_min(0).sqrt()
    if m >= n:
        return w64 @ vecs, s, vecs.T.contiguous()
    # W = U S Vh  =>  the part on U's span is U (Uᵀ W) = (U S) · (S⁻¹ Uᵀ W) where S > 0
    vh = (vecs.T @ w64) / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    return vecs * s, s, vh


def minor_svd(w: Tensor, r: int, cov: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The rank-``r`` part ``D`` of ``w`` that matters least, as ``(US [m,r], S [r], Vh [r,n])`` float32
    with ``D = US @ Vh`` and ``S`` the singular values of ``D``, descending.

    Without ``cov``: the ``r`` smallest singular triplets of ``w`` (:func:`gram_components`), the part
    of least Frobenius norm. With ``cov`` (an input covariance ``C = E[x xᵀ]``, see :func:`damped`):
    the part of least output energy ``E‖D x‖² = tr(D C Dᵀ)`` (:func:`output_minor`).
    """
    if cov is not None:
        return output_minor(w, r, cov)
    us, s, vh = gram_components(w, slice(0, r))
    return us.float(), s.float(), vh.float().contiguous()


def output_minor(w: Tensor, r: int, cov: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rank-``r`` part ``D = U Uᵀ W`` of ``W`` with the least output energy ``tr(D C Dᵀ)`` on inputs
    of covariance ``C``, as :func:`minor_svd` returns it. ``U [m, r]`` spans the ``r`` minor left singular
    vectors of ``W S`` for any ``S Sᵀ = C``, i.e. the eigenvectors of ``W C Wᵀ`` with the ``r`` smallest
    eigenvalues (among the ``k = min(m, n)`` of ``W``'s column space).

    Why it is optimal (Eckart–Young in the C-weighted norm ``‖X‖_C² = tr(X C Xᵀ) = ‖X S‖_F²``): for any
    kept matrix ``K`` of rank ``≤ k − r``, ``‖(W − K) S‖_F² ≥ Σ`` of the ``r`` smallest ``σ²(W S)``,
    because ``K S`` has rank ``≤ k − r``; ``K = (I − U Uᵀ) W`` attains it, since ``U Uᵀ W S`` is exactly
    the minor part of the SVD of ``W S``. So the dropped part is the minor part of ``W C^{1/2}`` mapped
    back, and the choice of square root (symmetric, Cholesky as in SVD-LLM) does not matter: nothing
    is factorized or inverted, and a singular ``C`` needs no damping for accuracy. (CorDA's KPA uses
    ``W C`` instead, which weights the inputs by ``C²``: the ``C^{1/2}`` form is the one whose criterion
    is the output energy.) For ``m > n`` the ``m x m`` problem is reduced to ``n x n`` with ``W = Q R``;
    ``W C Wᵀ = Q (R C Rᵀ) Qᵀ``. With ``C = I`` the result is :func:`minor_svd`'s plain minor part.
    All in float64.
    """
    w64, c = w.detach().double(), cov.detach().double().to(w.device)
    m, n = w64.shape
    q, rr = (None, w64) if m <= n else torch.linalg.qr(w64)
    g = rr @ c @ rr.T
    _, z = torch.linalg.eigh((g + g.T) / 2)  # ascending
    u = z[:, :r] if q is None else q @ z[:, :r]  # [m, r], orthonormal
    p, s, vh = torch.linalg.svd(u.T @ w64, full_matrices=False)  # Uᵀ W = P S Vh  =>  D = (U P) S Vh
    return (u @ (p * s)).float(), s.float(), vh.float().contiguous()


def damped(cov: Tensor, damp: float) -> Tensor:
    """``C + δ·mean(diag C)·I``: an input covariance with ``δ`` times its mean eigenvalue added (float64).

    In :func:`output_minor` the damping is a prior, not a numerical fix: ``tr(D C_δ Dᵀ) = tr(D C Dᵀ) +
    δ·mean(diag C)·‖D‖_F²``, so among directions the calibration data leaves (nearly) unexcited it picks
    those of least weight energy (the plain minor components), and ``δ → ∞`` is the plain choice.
    """
    c = cov.detach().double()
    return c + torch.eye(c.shape[0], dtype=c.dtype, device=c.device) * (c.diagonal().mean() * damp)


class LowRank(NamedTuple):
    """``ΔW = B @ A`` with ``A [r, n]`` and ``B [m, r]``: the one low-rank type of svd-serve.

    Always in this order, (A, B), whatever the method or file format; any scale is already in B.
    """

    A: Tensor
    B: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> Tensor:
        """The ``m x n`` matrix (float32). Only for one module at a time, never for a whole model."""
        return self.B.float() @ self.A.float()

    def apply(self, x: Tensor) -> Tensor:
        """``x ↦ B (A x)`` over the last dimension, without forming ``B A``."""
        return F.linear(F.linear(x, self.A), self.B)

    def scaled(self, c: float | Tensor) -> "LowRank":
        return LowRank(self.A, self.B * c)

    def float(self) -> "LowRank":
        return LowRank(self.A.detach().float(), self.B.detach().float())

    @staticmethod
    def cat(parts: list["LowRank"]) -> "LowRank":
        """``Σ B_i A_i`` as one pair of factors (rank = Σ r_i)."""
        return LowRank(torch.cat([p.A for p in parts]), torch.cat([p.B for p in parts], dim=1))

    @staticmethod
    def from_svd(u: Tensor, s: Tensor, vh: Tensor, scale: float = 1.0) -> "LowRank":
        """``U diag(S) Vh = scale · B A`` with the singular values shared evenly between the factors:
        ``B = U √(S/scale)``, ``A = √(S/scale) Vh`` (PiSSA's split, and every balanced export)."""
        root = (s / scale).sqrt()
        return LowRank(root[:, None] * vh, u * root)


def factored_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``b @ a`` (``a [r, n]``, ``b [m, r]``) in float64, all r values.

    QR of both factors and an SVD of the small ``r x r`` core: ``b = Qb Rb``, ``aᵀ = Qa Ra``,
    ``Rb Raᵀ = Uc S Vcᵀ``, so ``b @ a = (Qb Uc) S (Qa Vc)ᵀ``, never forming the ``m x n`` product.
    """
    qb, rb = torch.linalg.qr(b.detach().double())
    qa, ra = torch.linalg.qr(a.detach().double().T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    return qb @ uc, s, vch @ qa.T


def exact_rank(s: Tensor, rtol: float = 1e-6) -> int:
    """How many singular values are above ``rtol * S[0]``: the rest are zero to working precision
    (the factors are float32; 1e-6 sits a decade above float32 rounding)."""
    return int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0


@dataclass
class Compressed:
    """What :func:`compress` returns: the factors and how they were chosen."""

    factors: LowRank
    sigma: Tensor  # singular values of B @ A, descending (all of them, before any truncation)
    rank: int  # components kept (0 for a zero ΔW, written as one zero component)
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F after truncation (0.0 when exact)

    @property
    def A(self) -> Tensor:
        return self.factors.A

    @property
    def B(self) -> Tensor:
        return self.factors.B


def compress(a: Tensor, b: Tensor, max_rank: int | None = None, rtol: float = 1e-6) -> Compressed:
    """Rewrite ``ΔW = b @ a`` (``a [r, n]``, ``b [m, r]``) in its smallest exact rank
    (:func:`factored_svd`, :func:`exact_rank`). With ``max_rank`` the best rank-``max_rank``
    approximation (Eckart–Young) is returned with its relative Frobenius error.
    The result is balanced: ``A = √S Vᵀ``, ``B = U √S``, float32.
    """
    u, s, vh = factored_svd(a, b)
    exact = exact_rank(s, rtol)
    keep = exact if max_rank is None else min(exact, max_rank)
    total = float(s.square().sum())
    # only components dropped by max_rank count: the ones below rtol are zero, so exact means 0.0
    err = float(s[keep:exact].square().sum() / total) ** 0.5 if total > 0 else 0.0
    keep_nz = max(keep, 1)  # a zero delta is written as one zero component, never as rank 0
    kept = s[:keep_nz] if keep > 0 else torch.zeros(1, dtype=s.dtype)
    a_new, b_new = LowRank.from_svd(u[:, :keep_nz], kept, vh[:keep_nz])
    return Compressed(LowRank(a_new.float().contiguous(), b_new.float().contiguous()),
                      sigma=s.float(), rank=keep, rel_error=err)
