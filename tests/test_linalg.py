"""``minor_svd`` (plain and activation-aware), ``top_svd``, ``leading_qr`` and ``compress`` against
dense ``torch.linalg.svd`` / ``torch.linalg.qr`` in float64."""

from __future__ import annotations

import math

import pytest
import torch

from svd_serve.linalg import (LowRank, Weighting, compress, damped, gram_components, keep_count, leading_qr,
                               minor_svd, relative_error, top_svd)

SHAPES = {"tall": (48, 20), "wide": (20, 48), "square": (32, 32)}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def power_law(m: int, n: int, exponent: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 ``m x n`` matrix with singular values ``i^-exponent`` and those values."""
    k = min(m, n)
    u, _ = torch.linalg.qr(randn(m, k, seed=seed).double())
    v, _ = torch.linalg.qr(randn(n, k, seed=seed + 1).double())
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    return ((u * s) @ v.T).float(), s


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("r", [1, 5])
def test_minor_svd_matches_full_svd(shape, r):
    w = randn(*shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    us_m, s_m, vh_m = minor_svd(w, r)
    assert us_m.shape == (shape[0], r) and s_m.shape == (r,) and vh_m.shape == (r, shape[1])
    smax = float(s[0])
    assert (s_m.double() - s[-r:]).abs().max() <= 1e-5 * smax
    assert torch.all(s_m[:-1] >= s_m[1:])  # descending
    projection = (u[:, -r:] * s[-r:]) @ vh[-r:]
    assert (us_m.double() @ vh_m.double() - projection).abs().max() <= 1e-5 * smax
    # the rows of Vh are unit right singular vectors: US = W Vᵀ
    assert torch.allclose(vh_m.double() @ vh_m.double().T, torch.eye(r, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("r", [1, 5])
def test_exact_top_svd_matches_float64_svd(shape, r):
    """The Gram-eigh route: the top-r projection and singular values to float32 precision, U and V
    orthonormal, each vector equal to the float64 SVD's up to sign (these random spectra have gaps)."""
    w = randn(*shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u_r, s_r, vh_r = top_svd(w, r)
    assert u_r.shape == (shape[0], r) and s_r.shape == (r,) and vh_r.shape == (r, shape[1])
    assert (s_r.double() - s[:r]).abs().max() <= 1e-6 * float(s[0])
    projection = (u[:, :r] * s[:r]) @ vh[:r]
    assert ((u_r.double() * s_r.double()) @ vh_r.double() - projection).abs().max() <= 1e-6 * float(s[0])
    eye = torch.eye(r, dtype=torch.float64)
    assert (u_r.double().T @ u_r.double() - eye).abs().max() <= 1e-6
    assert (vh_r.double() @ vh_r.double().T - eye).abs().max() <= 1e-6
    sign = torch.sign((vh_r.double() * vh[:r]).sum(1))
    assert (vh_r.double() * sign[:, None] - vh[:r]).abs().max() <= 1e-5
    assert (u_r.double() * sign - u[:, :r]).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gram_components_of_an_inner_range(shape):
    """Any contiguous range of the ascending singular triplets, not only the ends."""
    w = randn(*shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = min(shape)
    us_m, s_m, vh_m = gram_components(w, slice(3, 7))  # ascending positions 3..6 = descending k-7..k-4
    picked = slice(k - 7, k - 3)
    assert (s_m - s[picked]).abs().max() <= 1e-12 * float(s[0])
    assert (us_m @ vh_m - (u[:, picked] * s[picked]) @ vh[picked]).abs().max() <= 1e-10 * float(s[0])
    with pytest.raises(ValueError):
        gram_components(w, slice(5, 5))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("r", [1, 5])
def test_leading_qr_is_the_full_qr_truncated(shape, r):
    """The r leading columns of Q and rows of R of the full Householder QR (same signs), to float32
    rounding; R's first r columns upper triangular exactly."""
    w = randn(*shape)
    q, rr = torch.linalg.qr(w.double())
    q_r, r_r = leading_qr(w, r)
    assert q_r.dtype == r_r.dtype == torch.float32
    assert q_r.shape == (shape[0], r) and r_r.shape == (r, shape[1])
    assert (q_r.double() - q[:, :r]).abs().max() <= 1e-6  # orthonormal columns: entries ≤ 1
    assert (r_r.double() - rr[:r]).abs().max() <= 1e-6 * float(torch.linalg.matrix_norm(w.double(), 2))
    assert torch.equal(r_r[:, :r], r_r[:, :r].triu())


@pytest.mark.parametrize("shape", [(40, 16), (16, 40)], ids=["tall", "wide"])
def test_minor_svd_of_rank_deficient_matrix_is_zero(shape):
    w = randn(shape[0], 10) @ randn(10, shape[1], seed=1)  # rank 10 < k = 16
    us, s, vh = minor_svd(w, 4)
    assert s.abs().max() <= 1e-5 * float(torch.linalg.svdvals(w)[0])
    assert (us @ vh).abs().max() <= 1e-5 * float(w.abs().max())


@pytest.mark.parametrize("shape", [(256, 128), (128, 256)], ids=["tall", "wide"])
@pytest.mark.parametrize("exponent, accepted", [(1.0, 1e-3), (0.5, 2e-3)])  # as top_svd documents
def test_top_svd_randomized_on_decaying_spectrum(shape, exponent, accepted):
    w, s = power_law(*shape, exponent=exponent)
    r = 8
    torch.manual_seed(0)
    u_r, s_r, vh_r = top_svd(w, r, niter=4)
    assert u_r.shape == (shape[0], r) and vh_r.shape == (r, shape[1])
    rel = ((s_r.double() - s[:r]).abs() / s[:r]).max()
    assert rel <= accepted
    # exact path: the same values as a full SVD to float32 precision
    _, s_exact, _ = top_svd(w, r)
    assert ((s_exact.double() - s[:r]).abs() / s[:r]).max() <= 1e-5


def test_compress_finds_the_smallest_exact_rank():
    m, n, r, true_rank = 40, 30, 8, 5
    basis = randn(true_rank, n)
    a = randn(r, true_rank, seed=1) @ basis  # 8 rows spanning only 5 directions
    b = randn(m, r, seed=2)
    lr = compress(a, b)
    dense = b.double() @ a.double()
    assert lr.rank == true_rank and lr.A.shape == (true_rank, n) and lr.B.shape == (m, true_rank)
    assert lr.rel_error == 0.0
    assert torch.linalg.norm(lr.B.double() @ lr.A.double() - dense) <= 1e-6 * torch.linalg.norm(dense)
    assert torch.allclose(lr.sigma[:true_rank].double(), torch.linalg.svdvals(dense)[:true_rank], rtol=1e-5)


@pytest.mark.parametrize("max_rank", [1, 3])
def test_compress_truncation_error_is_the_singular_value_tail(max_rank):
    a, b = randn(6, 30), randn(40, 6, seed=1)
    dense = b.double() @ a.double()
    s = torch.linalg.svdvals(dense)
    lr = compress(a, b, max_rank=max_rank)
    assert lr.rank == max_rank and lr.A.shape[0] == max_rank
    tail = float(s[max_rank:].norm() / s.norm())
    assert lr.rel_error == pytest.approx(tail, rel=1e-6)
    measured = float(torch.linalg.norm(dense - lr.B.double() @ lr.A.double()) / torch.linalg.norm(dense))
    assert measured == pytest.approx(tail, rel=1e-5)


def test_compress_of_zero_delta_is_one_zero_component():
    lr = compress(torch.zeros(4, 10), torch.zeros(12, 4))
    assert lr.rank == 0 and lr.rel_error == 0.0
    assert lr.A.shape == (1, 10) and lr.B.shape == (12, 1) and not lr.A.any() and not lr.B.any()


# --- weighted truncation ----------------------------------------------------------------------------
def weighted_problem(m=40, n=30, r=6):
    """Factors of a rank-6 ΔW, a row weighting with a 100x spread and an anisotropic input covariance."""
    a, b = randn(r, n), randn(m, r, seed=1)
    fisher = torch.logspace(-2, 2, m, dtype=torch.float64)[torch.randperm(m, generator=torch.Generator().manual_seed(2))]
    x = randn(500, n, seed=3).double() * torch.logspace(-1, 1, n, dtype=torch.float64)
    return a, b, fisher, x.T @ x / x.shape[0]


WEIGHTINGS = {
    "fisher": lambda f, c: Weighting.fisher(f),
    "activation": lambda f, c: Weighting.activation(c),
    "both": lambda f, c: Weighting(rows=Weighting.fisher(f).rows, cols=Weighting.activation(c).cols,
                                   cols_inv=Weighting.activation(c).cols_inv),
}


@pytest.mark.parametrize("kind", WEIGHTINGS)
@pytest.mark.parametrize("k", [1, 3])
def test_weighted_compress_is_the_weighted_eckart_young_optimum(kind, k):
    """Against the dense weighted problem: SVD of D ΔW S, truncated, unweighted. The weighted error is
    the smallest possible (the tail of D ΔW S), the plain error is larger than plain truncation's."""
    a, b, fisher, cov = weighted_problem()
    w = WEIGHTINGS[kind](fisher, cov)
    c = compress(a, b, max_rank=k, weighting=w)
    dense = b.double() @ a.double()
    d = w.rows if w.rows is not None else torch.ones(dense.shape[0], dtype=torch.float64)
    s_root = w.cols if w.cols is not None else torch.eye(dense.shape[1], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(d[:, None] * dense @ s_root)
    best = ((u[:, :k] * s[:k]) @ vh[:k]) / d[:, None] @ torch.linalg.inv(s_root)
    approx = c.B.double() @ c.A.double()
    assert c.rank == k and c.A.shape == (k, dense.shape[1]) and c.B.shape == (dense.shape[0], k)
    assert (approx - best).abs().max() <= 1e-5 * dense.abs().max()
    assert c.weighted_error == pytest.approx(float(s[k:].norm() / s.norm()), rel=1e-6)
    assert c.rel_error == pytest.approx(float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense)), rel=1e-5)
    assert c.rel_error > compress(a, b, max_rank=k).rel_error  # the weighting traded plain error ...
    plain = compress(a, b, max_rank=k)  # ... for its own norm
    assert c.weighted_error < relative_error(LowRank(a, b), plain.factors, w)
    assert torch.allclose(c.sigma.double(), torch.linalg.svdvals(dense)[:6].float().double(), rtol=1e-5)


def test_weighted_compress_without_truncation_is_exact():
    a, b, fisher, cov = weighted_problem()
    c = compress(a, b, weighting=Weighting.activation(cov))
    dense = b.double() @ a.double()
    assert c.rank == 6 and c.rel_error == 0.0 == c.weighted_error
    assert (c.B.double() @ c.A.double() - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_output_error_is_measured_on_the_inputs():
    """``Weighting.activation(C, damp=None)``: ``‖E S‖_F = ‖E X‖_F / √N`` exactly, in factor space."""
    a, b, _, _ = weighted_problem()
    x = randn(50, 30, seed=4).double()
    measure = Weighting.activation(x.T @ x / 50, damp=None)
    c = compress(a, b, max_rank=2)
    dense, approx = b.double() @ a.double(), c.B.double() @ c.A.double()
    expected = torch.linalg.norm((dense - approx) @ x.T) / torch.linalg.norm(dense @ x.T)
    assert relative_error(LowRank(a, b), c.factors, measure) == pytest.approx(float(expected), rel=1e-6)


def test_degenerate_weights_fall_back_to_the_identity():
    """A module the calibration data never reached (zero Fisher, zero covariance) is truncated plainly."""
    a, b = randn(4, 30), randn(40, 4, seed=1)
    plain = compress(a, b, max_rank=2)
    for w in (Weighting.fisher(torch.zeros(40)), Weighting.activation(torch.zeros(30, 30))):
        c = compress(a, b, max_rank=2, weighting=w)
        assert c.rel_error == pytest.approx(plain.rel_error, rel=1e-6)


def test_energy_keeps_the_fewest_components():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert keep_count(s, energy=9 / 14) == 1 and keep_count(s, energy=0.7) == 2 and keep_count(s, energy=1.0) == 3
    assert keep_count(s, max_rank=2) == 2 and keep_count(s) == 3


# --- activation-aware minor components (linalg.output_minor) -----------------------------------------
def covariance(n: int, samples: int, seed: int = 3) -> torch.Tensor:
    """``Xᵀ X / N`` of inputs with very unequal feature scales (as LLM activations); singular if N < n."""
    scales = torch.logspace(1, -1, n, dtype=torch.float64)
    x = randn(samples, n, seed=seed).double() * scales
    return x.T @ x / samples


def energy(d: torch.Tensor, cov: torch.Tensor) -> float:
    """Output energy ``tr(D C Dᵀ)`` of a dropped part on inputs of covariance C."""
    return float(torch.einsum("ij,jk,ik->", d, cov, d))


def sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("samples", [400, 12], ids=["full-rank-C", "singular-C"])
def test_activation_minor_is_the_c_weighted_eckart_young_optimum(shape, samples):
    m, n = shape
    k, r = min(shape), 5
    w = randn(m, n)
    cov = covariance(n, samples)
    us, s, vh = minor_svd(w, r, cov)
    assert us.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n) and us.dtype == torch.float32
    assert torch.all(s[:-1] >= s[1:])
    d = us.double() @ vh.double()
    w64 = w.double()
    # the dropped part is a projection of W: W − D keeps rank k − r, D has rank r
    sv_kept = torch.linalg.svdvals(w64 - d)
    assert sv_kept[k - r:].max() <= 1e-5 * float(sv_kept[0])
    assert torch.allclose(torch.linalg.svdvals(d)[:r], s.double(), rtol=1e-5)
    # its output energy is the Eckart–Young bound in the C-weighted norm (a symmetric C^1/2, full SVD):
    # no kept matrix of rank k − r loses less
    tail = float(torch.linalg.svdvals(w64 @ sqrt_psd(cov))[k - r:].square().sum())
    total = energy(w64, cov)
    assert abs(energy(d, cov) - tail) <= 1e-6 * total
    # and less than the plain minor components lose (by a wide margin on these unequal input scales)
    plain = minor_svd(w, r)
    assert energy(d, cov) < 0.5 * energy(plain[0].double() @ plain[2].double(), cov)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_activation_minor_with_identity_covariance_is_the_plain_minor_part(shape):
    w = randn(*shape)
    d_plain = (lambda us, s, vh: us.double() @ vh.double())(*minor_svd(w, 5))
    d_cov = (lambda us, s, vh: us.double() @ vh.double())(*minor_svd(w, 5, torch.eye(shape[1], dtype=torch.float64)))
    assert (d_cov - d_plain).abs().max() <= 1e-5 * float(torch.linalg.svdvals(w.double())[0])


@pytest.mark.parametrize("shape", [(3, 5), (5, 3)], ids=["wide", "tall"])
def test_activation_minor_equals_the_brute_force_optimum(shape):
    """r = 1 on a tiny problem: the ways to drop one direction ``u uᵀ W`` (u a unit vector in W's column
    space, so that the kept part loses a rank), searched exhaustively at random and then twice more
    densely around the best one found; none loses less output energy, and the search reaches ours."""
    m, n = shape
    w = randn(m, n, seed=5)
    cov = covariance(n, 50, seed=6)
    us, _, vh = minor_svd(w, 1, cov)
    best = energy(us.double() @ vh.double(), cov)
    basis = torch.linalg.qr(w.double())[0] if m > n else torch.eye(m, dtype=torch.float64)
    wcw = basis.T @ w.double() @ cov @ w.double().T @ basis
    gen = torch.Generator().manual_seed(7)
    centre, radius, found, first = None, None, math.inf, None
    for _ in range(3):
        z = torch.randn(200_000, basis.shape[1], generator=gen, dtype=torch.float64)
        if centre is not None:
            z = centre + radius * z
        z = z / z.norm(dim=1, keepdim=True)
        energies = torch.einsum("bi,ij,bj->b", z, wcw, z)  # ‖u uᵀ W S‖² = uᵀ W C Wᵀ u
        assert float(energies.min()) >= best * (1 - 1e-6)  # (ours is returned in float32)
        if first is None:
            first = energies
        i = int(energies.argmin())
        if energies[i] < found:
            found, centre = float(energies[i]), z[i]
        radius = 0.02 if radius is None else radius / 10
    assert found <= best * (1 + 1e-4)
    energies = first
    assert best < 0.5 * float(energies.median())  # the optimum is not a flat landscape


def test_damping_interpolates_towards_the_plain_choice():
    w, cov = randn(20, 48), covariance(48, 12)  # singular C: most directions unexcited
    d_plain = (lambda us, s, vh: us.double() @ vh.double())(*minor_svd(w, 4))
    d_huge = (lambda us, s, vh: us.double() @ vh.double())(*minor_svd(w, 4, damped(cov, 1e8)))
    assert (d_huge - d_plain).abs().max() <= 1e-4 * float(torch.linalg.svdvals(w.double())[0])
    c = damped(cov, 0.5)
    assert torch.allclose(c - cov, torch.eye(48, dtype=torch.float64) * 0.5 * cov.diagonal().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scratch", [False, True])
def test_add_low_rank_rounds_the_exact_sum_once(dtype, scratch):
    """``W + B A`` in float32 (float64 for a float64 weight), rounded once to the weight's dtype, in
    place; a reused scratch buffer (larger than the weight, holding an earlier module's values)
    changes nothing."""
    from svd_serve.linalg import add_low_rank_

    w0, a, b = randn(24, 40, seed=1).to(dtype), randn(3, 40, seed=2), randn(24, 3, seed=3)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    want = (w0.to(compute) + b.to(compute) @ a.to(compute)).to(dtype)
    w = w0.clone()
    buf = torch.full((2000,), 7.0) if scratch else None
    add_low_rank_(w, a, b, scratch=buf)
    # the same sum up to float32 (float64) summation order, then at most one unit of rounding apart
    tol = {torch.float32: 1e-6, torch.float64: 1e-13}.get(dtype, torch.finfo(dtype).eps)
    assert w.dtype == dtype
    assert (w.to(compute) - want.to(compute)).abs().max() <= tol * want.to(compute).abs().max()


def test_nonfinite_counts_only_real_nan_and_inf():
    """A tensor whose plain sum overflows its dtype (finite values) is finite; one NaN or infinity is
    found and counted, in every float dtype."""
    from svd_serve.files import nonfinite

    big = torch.full((64, 64), 60000.0, dtype=torch.float16)  # sum far beyond float16's 65504
    assert not torch.isfinite(big.sum()) and nonfinite([("big", big)]) is None
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = randn(16, 16).to(dtype)
        assert nonfinite([("t", t)]) is None
        t[3, 4], t[5, 6] = float("nan"), float("-inf")
        assert nonfinite([("ok", torch.ones(2, dtype=dtype)), ("t", t)]) == ("t", 2)
