"""``minor_svd`` (plain and activation-aware), ``top_svd`` and ``compress`` against dense
``torch.linalg.svd`` in float64."""

from __future__ import annotations

import math

import pytest
import torch

from svd_serve.linalg import compress, damped, minor_svd, top_svd

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
