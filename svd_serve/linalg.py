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

    ``niter=None`` is exact: the ``r`` top eigenpairs of the ``k x k`` Gram matrix in float64
    (:func:`exact_svd`), several times faster than ``torch.linalg.svd`` and more accurate than its
    float32 result. An integer runs randomized subspace iteration (Halko et al.) with ``niter`` power
    iterations on a ``max(2r, r + 8)``-column sketch. Its accuracy depends on how fast the spectrum
    decays; measured at ``niter=4`` (top ``r`` singular values, max relative error,
    ``tests/test_linalg.py``): ``σ_i ∝ 1/i`` within 1e-5, ``σ_i ∝ 1/√i`` within 2e-3, flatter spectra
    (``σ_i ∝ i^-0.25``) only within 1e-2 to 6e-2. Use ``niter=None`` when the exact values matter.
    """
    if niter is None:
        k = min(w.shape)
        return tuple(t.float().contiguous() for t in exact_svd(w, slice(k - r, k)))
    w = w.detach().float()
    q = min(max(2 * r, r + 8), min(w.shape))
    u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].T.contiguous()


def exact_svd(w: Tensor, which: slice) -> tuple[Tensor, Tensor, Tensor]:
    """Singular triplets of ``w`` picked as in :func:`gram_components` (by position in ascending
    order), as ``(U, S, Vh)`` float64 by descending singular value; ``U = (U S) / S`` (a zero
    component keeps ``U = 0``)."""
    us, s, vh = gram_components(w, which)
    return us / torch.where(s > 0, s, torch.ones_like(s)), s, vh


def gram_components(w: Tensor, which: slice) -> tuple[Tensor, Tensor, Tensor]:
    """Singular triplets of ``w`` picked by position in ASCENDING order of singular value (``which``
    indexes the ``k = min(m, n)`` of them, a contiguous range), from the eigenpairs of the ``k x k``
    Gram matrix in float64, computed on the CPU (:func:`gram_eigh`; results on ``w``'s device).

    Returned in float64 as ``(US [m,r], S [r], Vh [r,n])`` sorted by descending singular value, where
    ``US = U diag(S)`` is computed as ``W V`` (for ``m >= n``; ``Uᵀ W`` is split for ``m < n``) so that
    ``US @ Vh`` is the exact projection of ``W`` on the chosen subspace even when some singular values
    are zero (their ``US`` is zero and their ``Vh`` row any unit vector).
    """
    w64 = w.detach().to("cpu", torch.float64)
    m, n = w64.shape
    lo, hi, step = which.indices(min(m, n))
    if step != 1 or hi <= lo:
        raise ValueError(f"gram_components: {which} is not a non-empty contiguous range")
    evals, evecs = gram_eigh(w64, lo, hi)  # ascending
    vecs = evecs.flip(-1)
    s = evals.flip(-1).clamp_min(0).sqrt()
    if m >= n:
        out = w64 @ vecs, s, vecs.T.contiguous()
    else:  # W = U S Vh  =>  the part on U's span is U (Uᵀ W) = (U S) · (S⁻¹ Uᵀ W) where S > 0
        out = vecs * s, s, (vecs.T @ w64) / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    return tuple(t.to(w.device) for t in out)


def gram_eigh(w: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``lo .. hi-1`` (ascending) and eigenvectors of the ``k x k`` Gram matrix of the
    float64 CPU matrix ``w`` (``WᵀW`` for ``m >= n``, else ``WWᵀ``): one triangle of it by BLAS
    ``syrk`` (half the flops of a product), then LAPACK's subset solver ``syevr`` (MRRR), which
    computes only the eigenvectors asked for: 3-4x faster than a full ``eigh`` for a few of them."""
    from scipy.linalg import eigh
    from scipy.linalg.blas import dsyrk

    m, n = w.shape
    wt = w.contiguous().numpy().T  # Wᵀ, column-major without a copy
    gram = dsyrk(1.0, wt, trans=0 if m >= n else 1)  # the upper triangle of WᵀW or WWᵀ
    evals, evecs = eigh(gram, lower=False, subset_by_index=[lo, hi - 1], driver="evr", overwrite_a=True,
                        check_finite=False)
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def leading_qr(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(Qᵣ [m,r], Rᵣ [r,n])``: the first ``r`` columns of ``Q`` and rows of ``R`` of the Householder QR
    ``W = Q R`` (LAPACK's signs), float32. The first r Householder steps see only ``W[:, :r]``, so
    ``Qᵣ`` and ``R[:r, :r]`` are the QR of those columns alone, and the rest of ``Rᵣ`` is ``Qᵣᵀ W[:, r:]``:
    ``O(m n r)`` flops instead of ``O(m n k)``, all in float64."""
    w64 = w.detach().double()
    q, head = torch.linalg.qr(w64[:, :r])
    return q.float().contiguous(), torch.cat([head, q.T @ w64[:, r:]], 1).float()


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
    def of_dense(d: Tensor) -> "LowRank":
        """A dense ``[m, n]`` ΔW as factors ``(I, D)`` or ``(D, I)``, whichever has the smaller rank."""
        m, n = d.shape
        return LowRank(torch.eye(n, dtype=d.dtype), d) if n <= m else LowRank(d, torch.eye(m, dtype=d.dtype))

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


DAMP = 0.01  # default damping of weightings: a fraction of the mean weight added to every weight


@dataclass(frozen=True)
class Weighting:
    """Where a truncation's error is measured: ``‖D (ΔW − B'A') S‖_F`` instead of ``‖ΔW − B'A'‖_F``.

    ``D = diag(rows)`` weights the output side (FWSVD: ``rows = √I``, ``I`` the Fisher row sums of
    squared gradients); ``S`` the input side (activation-aware: ``S Sᵀ = C``, the covariance of the
    module's inputs, so the error is the output error ``‖(ΔW − B'A') X‖_F / √N``). Either may be
    None (the identity). The weighted problem is solved exactly in factor space: weigh the factors
    (``D B``, ``A S``), truncate ``(D B)(A S)`` by Eckart–Young, unweigh (``D⁻¹ ·``, ``· S⁻¹``), which
    needs D and S invertible: :meth:`fisher` and :meth:`activation` damp them.
    """

    rows: Tensor | None = None  # [m], > 0
    cols: Tensor | None = None  # S [n, k]
    cols_inv: Tensor | None = None  # S⁻¹ [k, n]
    cov: Tensor | None = None  # C = S Sᵀ [n, n] instead of S: enough to measure (:meth:`norm`), not to truncate

    @classmethod
    def fisher(cls, row_sums: Tensor, damp: float = DAMP) -> "Weighting":
        """``D = diag(√(I + damp·mean(I)))`` from Fisher row sums ``I [m]`` (a module the data never
        reached, ``I = 0``, gets the identity)."""
        i = row_sums.double().clamp_min(0)
        mean = i.mean()
        return cls(rows=(i + damp * mean).sqrt() if mean > 0 else torch.ones_like(i))

    @classmethod
    def activation(cls, cov: Tensor, damp: float | None = DAMP) -> "Weighting":
        """``S = V diag(√λ)`` from the eigenpairs of :func:`damped` ``(C, damp)`` (so ``S Sᵀ = C +
        damp·mean(diag C)·I``). ``damp=None``: ``C`` itself, for measuring only (``‖E S‖_F² = tr(E C Eᵀ)``, no
        factorization)."""
        if damp is None:
            return cls(cov=cov.detach().double())
        if not cov.diagonal().mean() > 0:
            return cls()  # inputs the calibration data never reached: the plain truncation
        lam, vecs = torch.linalg.eigh(damped(cov, damp))
        root = lam.clamp_min(0).sqrt()
        return cls(cols=vecs * root, cols_inv=(vecs / root).T.contiguous())

    def __bool__(self) -> bool:
        return self.rows is not None or self.cols is not None

    def weigh(self, f: LowRank) -> LowRank:
        """``(A S, D B)`` in float64."""
        a, b = f.A.detach().double(), f.B.detach().double()
        return LowRank(a @ self.cols if self.cols is not None else a,
                       b * self.rows[:, None] if self.rows is not None else b)

    def unweigh(self, f: LowRank) -> LowRank:
        """``(A S⁻¹, D⁻¹ B)`` in float64."""
        a, b = f.A.double(), f.B.double()
        if self.cols is not None:
            if self.cols_inv is None:
                raise ValueError("this weighting measures only: S has no inverse")
            a = a @ self.cols_inv
        return LowRank(a, b / self.rows[:, None] if self.rows is not None else b)

    def norm(self, f: LowRank) -> float:
        """``‖D B A S‖_F`` without forming it (QR of both weighted factors, float64); with ``cov``,
        ``√tr((D B)ᵀ(D B) · A C Aᵀ)``."""
        if self.cov is not None:
            a, b = f.A.detach().double(), f.B.detach().double()
            b = b * self.rows[:, None] if self.rows is not None else b
            return float(((b.T @ b) * (a @ self.cov.to(a.device) @ a.T)).sum().clamp_min(0).sqrt())
        a, b = self.weigh(f)
        rb = torch.linalg.qr(b, mode="r")[1]
        ra = torch.linalg.qr(a.T, mode="r")[1]
        return float(torch.linalg.norm(rb @ ra.T))


def relative_error(exact: LowRank, approx: LowRank, weighting: Weighting | None = None) -> float:
    """``‖D (BA − B'A') S‖_F / ‖D BA S‖_F`` in factor space (0.0 for a zero ΔW equal to its approximation;
    the absolute error when ΔW is zero)."""
    w = weighting if weighting is not None else Weighting()
    diff = w.norm(LowRank(torch.cat([exact.A.double(), approx.A.double()]),
                          torch.cat([exact.B.double(), -approx.B.double()], 1)))
    ref = w.norm(exact)
    return diff / ref if ref > 0 else diff


@dataclass
class Compressed:
    """What :func:`compress` returns: the factors and how they were chosen."""

    factors: LowRank
    sigma: Tensor  # singular values of B @ A, descending (all of them, before any truncation)
    rank: int  # components kept (0 for a zero ΔW, written as one zero component)
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F after truncation (0.0 when exact)
    weighted_error: float = 0.0  # the same in the weighted norm that chose the components (= rel_error unweighted)
    output_error: float | None = None  # ‖(ΔW − B A) X‖_F / ‖ΔW X‖_F on calibration inputs, where measured

    @property
    def A(self) -> Tensor:
        return self.factors.A

    @property
    def B(self) -> Tensor:
        return self.factors.B


def keep_count(s: Tensor, max_rank: int | None = None, energy: float | None = None, rtol: float = 1e-6) -> int:
    """How many of the descending singular values ``s`` a truncation keeps: all nonzero ones
    (:func:`exact_rank`), at most ``max_rank``, or the fewest holding a fraction ``energy`` of ``Σ s²``."""
    exact = exact_rank(s, rtol)
    if energy is not None and exact:
        e = s[:exact].double().square()
        cum = (e.cumsum(0) / e.sum()).tolist()
        return next((i + 1 for i, c in enumerate(cum) if c >= energy * (1 - 1e-12)), exact)
    return exact if max_rank is None else min(exact, max_rank)


def compress(a: Tensor, b: Tensor, max_rank: int | None = None, rtol: float = 1e-6,
             weighting: Weighting | None = None, energy: float | None = None) -> Compressed:
    """Rewrite ``ΔW = b @ a`` (``a [r, n]``, ``b [m, r]``) in its smallest exact rank
    (:func:`factored_svd`, :func:`exact_rank`). With ``max_rank`` (or ``energy``, the fewest components
    holding that fraction of ``‖ΔW‖²``) the best approximation of that rank (Eckart–Young) is returned
    with its relative Frobenius error. With a ``weighting`` the best one in the weighted norm
    ``‖D (ΔW − B'A') S‖_F`` (:class:`Weighting`), exact in factor space; ``rel_error`` is still the
    plain Frobenius error, ``weighted_error`` the weighted one.
    The result is balanced: ``A = √S Vᵀ``, ``B = U √S``, float32.
    """
    if weighting:
        u, s, vh = factored_svd(*weighting.weigh(LowRank(a, b)))
        keep, exact = keep_count(s, max_rank, energy, rtol), exact_rank(s, rtol)
        if keep > 0:
            w_err = float(s[keep:exact].square().sum() / s.square().sum()) ** 0.5
            kept = weighting.unweigh(LowRank.from_svd(u[:, :keep], s[:keep], vh[:keep]))
            plain = compress(*kept)  # balanced factors of the same product
            err = relative_error(LowRank(a, b), plain.factors) if keep < exact else 0.0
            return Compressed(plain.factors, sigma=factored_svd(a, b)[1].float(), rank=plain.rank,
                              rel_error=err, weighted_error=w_err)
    u, s, vh = factored_svd(a, b)
    exact = exact_rank(s, rtol)
    keep = keep_count(s, max_rank, energy, rtol)
    total = float(s.square().sum())
    # only components dropped by max_rank count: the ones below rtol are zero, so exact means 0.0
    err = float(s[keep:exact].square().sum() / total) ** 0.5 if total > 0 else 0.0
    keep_nz = max(keep, 1)  # a zero delta is written as one zero component, never as rank 0
    kept = s[:keep_nz] if keep > 0 else torch.zeros(1, dtype=s.dtype)
    a_new, b_new = LowRank.from_svd(u[:, :keep_nz], kept, vh[:keep_nz])
    return Compressed(LowRank(a_new.float().contiguous(), b_new.float().contiguous()),
                      sigma=s.float(), rank=keep, rel_error=err, weighted_error=err)


@torch.no_grad()
def add_low_rank_(weight: Tensor, a: Tensor, b: Tensor, scratch: Tensor | None = None) -> None:
    """``W ← W + B A`` in place, computed in float32 (float64 for a float64 weight) and stored in the
    weight's dtype, rounded once. ``scratch``: a float32 buffer of at least ``weight.numel()`` values
    on the weight's device to compute in (a caller folding module after module saves allocating and
    faulting in a fresh float32 copy of each weight)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = a.to(weight.device, compute), b.to(weight.device, compute)
    if weight.dtype == compute:
        weight.addmm_(b, a)
        return
    if scratch is not None and scratch.dtype == compute and scratch.numel() >= weight.numel():
        w = scratch.reshape(-1)[:weight.numel()].view(weight.shape).copy_(weight)
    else:
        w = weight.to(compute)
    weight.copy_(w.addmm_(b, a))
