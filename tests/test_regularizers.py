"""Regularizer values against their formulas, on small tensors set by hand (formulas in numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svd_serve.adapter import AdapterConfig, AdapterSet
from svd_serve.methods.kasa import KaSA, KaSAOptions
from svd_serve.methods.salt import SALT, SALTOptions
from svd_serve.methods.sorsa import SORSA, SORSAOptions


def fill(layer: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Random values in every parameter and buffer; returns them as float64 numpy arrays."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            t.copy_(torch.randn(t.shape, generator=g))
            values[name] = t.double().numpy().copy()
    return values


def fro(x: np.ndarray) -> float:
    return float(np.sqrt((x ** 2).sum()))


def orthogonality(a: np.ndarray, b: np.ndarray) -> float:
    r = a.shape[0]
    return fro(a @ a.T - np.eye(r)) + fro(b.T @ b - np.eye(r))


def kasa_formula(v, beta, gamma):
    return beta * (v["d"] ** 2).sum() + gamma * orthogonality(v["A"], v["B"])


def test_kasa():
    layer = KaSA(7, 5, KaSAOptions(rank=3, beta=0.3, gamma=0.7))
    v = fill(layer, 0)
    assert float(layer.regularizer().detach()) == pytest.approx(kasa_formula(v, 0.3, 0.7), rel=1e-6)


def test_kasa_is_zero_at_orthonormal_factors_and_zero_d():
    layer = KaSA(6, 4, KaSAOptions(rank=2, beta=1.0, gamma=1.0))
    with torch.no_grad():
        layer.A.copy_(torch.eye(4)[:2])
        layer.B.copy_(torch.eye(6)[:, :2])
        layer.d.zero_()
    assert float(layer.regularizer().detach()) == 0.0


def test_sorsa():
    layer = SORSA(6, 8, SORSAOptions(rank=3, gamma=0.25))
    v = fill(layer, 1)
    assert float(layer.regularizer().detach()) == pytest.approx(0.25 * orthogonality(v["A"], v["B"]), rel=1e-6)


def test_salt():
    layer = SALT(12, 10, SALTOptions(rank=2, ratio=0.3, reg=0.5))  # k = 10, k_s = 3, tail 7
    v = fill(layer, 2)
    ks = 3
    s = v["S"][:ks]
    top = np.maximum(v["scale_a"] * s + v["shift_b"], 0) - s
    expected = 0.5 * (fro(top) + fro(v["X"] @ v["Y"]))
    assert float(layer.regularizer().detach()) == pytest.approx(expected, rel=1e-6)


def test_salt_off_by_default():
    layer = SALT(12, 10, SALTOptions(rank=2))
    fill(layer, 3)
    assert layer.regularizer() is None


def test_adapter_set_regularizer_is_the_mean_over_layers():
    targets = {"model.layers.0.q_proj": [8, 6], "model.layers.0.down_proj": [5, 9], "model.layers.1.up_proj": [9, 5]}
    config = AdapterConfig(method="kasa", options={"rank": 2, "alpha": None, "beta": 0.2, "gamma": 0.4},
                           targets=targets, target_spec="", architecture="", base_fingerprint="")
    adapters = AdapterSet(config)
    per_layer = [kasa_formula(fill(layer, i), 0.2, 0.4) for i, (_, layer) in enumerate(adapters.items())]
    assert len(per_layer) == 3 and len(set(per_layer)) == 3
    assert float(adapters.regularizer().detach()) == pytest.approx(np.mean(per_layer), rel=1e-6)


def test_adapter_set_without_regularizer():
    config = AdapterConfig(method="lora", options={"rank": 2, "alpha": None}, targets={"x": [4, 4]},
                           target_spec="", architecture="", base_fingerprint="")
    assert AdapterSet(config).regularizer() is None
