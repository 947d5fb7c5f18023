"""``minor_svd``, ``top_svd`` and ``compress`` against dense ``torch.linalg.svd`` in float64."""

from __future__ import annotations

import pytest
import torch

from svd_serve.linalg import compress, minor_svd, top_svd

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
