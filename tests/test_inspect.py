"""`svd-serve inspect`: spectra, energy, exported rank; a PNG for an adapter of every method."""

from __future__ import annotations

import pytest
import torch
from helpers import folded, make_adapter

from svd_serve.adapter import AdapterSet
from svd_serve.methods import METHODS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def documented_bound(method: str, r: int, w: torch.Tensor) -> int:
    """The rank bound of ΔW the README's method table gives for base weight ``w`` (defaults: SALT
    ratio 0.1, KORE B and A, OSFT energy 0.9)."""
    k = min(w.shape)
    if method == "osft":  # k − k_high, k_high the fewest top components holding 90 % of ‖W‖²
        power = torch.linalg.svdvals(w.double()).square()
        return k - int(torch.searchsorted(power.cumsum(0) / power.sum(), 0.9)) - 1
    return {"lora": r, "svfit": r, "delta": r, "diffora": r, "codyra": r, "svf": k, "sst": k,
            "salt": max(1, int(k * 0.1)) + r}.get(method, 2 * r)


@pytest.mark.parametrize("method", list(METHODS))
def test_plot_every_method(method, tiny_model, tmp_path, run_cli):
    import matplotlib.pyplot as plt

    base = tiny_model("llama")
    path = make_adapter(base, tmp_path / method, method)
    png = tmp_path / "spectra.png"
    code, out = run_cli("inspect", "--adapter", path, "--base", base, "--plot", png)
    assert code == 0, out
    assert png.read_bytes()[:8] == PNG_MAGIC
    img = plt.imread(png)
    assert img.shape[0] > 400 and img.shape[1] > 800  # 4 modules x 3 panels
    assert img[..., :3].std() > 0.05  # something was drawn
    lines = out.splitlines()
    model = folded(base)
    for name, layer in AdapterSet.load(path).items():
        row = next(l for l in lines if l.startswith(name + " "))
        a, b = layer.delta()  # the rank of the dense ΔW, counted independently of inspect's factored SVD
        sigma = torch.linalg.svdvals(b.double() @ a.double())
        rank = int((sigma > 1e-6 * sigma[0]).sum())
        assert rank == documented_bound(method, 4, model.get_submodule(name).weight)  # a random ΔW reaches its bound
        assert row.split()[2:4] == [str(rank), str(rank)], row


def test_spectra_match_folded_model(tiny_model, tmp_path):
    """σ(W+ΔW) equals the spectrum of the folded weight; Δσ and energies follow from it."""
    from svd_serve.inspection import inspect

    base = tiny_model("llama")
    path = make_adapter(base, tmp_path / "pissa", "pissa", seed=1)
    specs = inspect(path, base)
    model, adapters = folded(base, path), AdapterSet.load(path)
    for s in specs:
        w = model.get_submodule(s.name).weight.detach().double()
        torch.testing.assert_close(s.adapted_sigma, torch.linalg.svdvals(w).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.dsigma, s.adapted_sigma - s.base_sigma)
        a, b = adapters.layers[s.name.replace(".", "__")].delta()
        dense = torch.linalg.svdvals((b @ a).double())
        assert s.rank == int((dense > 1e-6 * dense[0]).sum()) == 8  # PiSSA: 2r with r = 4
        energy = dense[: s.rank].square().cumsum(0) / dense.square().sum()
        torch.testing.assert_close(s.energy[: s.rank].double(), energy, rtol=1e-5, atol=1e-6)
        assert s.rank_for(1.0) == s.rank and 1 <= s.rank_for(0.9) <= s.rank
        assert s.rank_for(0.9) == int((energy < 0.9).sum()) + 1


def test_without_base_and_truncated(tiny_model, tmp_path, run_cli):
    from svd_serve.inspection import inspect

    base = tiny_model("llama")
    path = make_adapter(base, tmp_path / "kasa", "kasa")
    specs = inspect(path, max_rank=3, modules=r"layers\.0\.")
    assert [s.name for s in specs] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    for s in specs:
        assert s.base_sigma is None and s.exported_rank == 3 and s.rank == 8
        expected = float(s.delta_sigma[3:].square().sum() / s.delta_sigma.square().sum()) ** 0.5
        assert s.rel_error == pytest.approx(expected, rel=1e-5)
    code, out = run_cli("inspect", "--adapter", path, "--plot", tmp_path / "d.png")
    assert code == 0, out
    assert "σ1(W)" not in out and (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--modules", "nothing_matches"], "matches none"),
    (["--plot", "spectra.jpg"], "must name a .png"),
    (["--max-rank", "0"], "at least 1"),
])
def test_bad_input(args, message, tiny_model, tmp_path, run_cli):
    path = make_adapter(tiny_model("llama"), tmp_path / "lora")
    code, out = run_cli("inspect", "--adapter", path, *args)
    assert code == 2 and message in out, out


def test_not_an_adapter(tmp_path, run_cli):
    code, out = run_cli("inspect", "--adapter", tmp_path)
    assert code == 2 and "not an svd-serve adapter" in out
