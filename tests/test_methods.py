"""Every method on tiny Llama, Qwen2 and Phi-3 with all-linear targets (fused qkv/gate_up, down_proj with
out < in): the adapted model equals the base at init (KaSA: the base minus its dropped components),
and after a random perturbation of every trainable tensor, ``fold`` and a PEFT export reproduce it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import Env, create, gap, logits, perturb
from safetensors.torch import load_file

from svd_serve.adapter import AdapterSet
from svd_serve.export import export
from svd_serve.fold import fold
from svd_serve.methods import METHODS
from svd_serve.methods.corda import CorDAOptions, damped_inverse
from svd_serve.model import load_base

ARCHS = ["llama", "qwen2", "phi3"]
RANK = 4
TOL = 1e-4  # fp32, max |Δ logits|


def minor_piece(w: torch.Tensor, r: int, opts, cov: torch.Tensor) -> torch.Tensor:
    """The rank-r part of ``w`` (float64) that KaSA drops and MiLoRA/SoMA train, from a full SVD: the r
    smallest singular components, or with ``select=activation`` ``U Uᵀ W`` where U are the r minor left
    singular vectors (among W's k) of ``W C^1/2`` for the damped covariance C (symmetric square root)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if opts.select == "weight":
        return (u[:, -r:] * s[-r:]) @ vh[-r:]
    c = cov.double() + torch.eye(cov.shape[0], dtype=torch.float64) * cov.double().diagonal().mean() * opts.damp
    evals, evecs = torch.linalg.eigh(c)
    u_c = torch.linalg.svd(w @ (evecs * evals.sqrt()) @ evecs.T, full_matrices=False)[0][:, -r:]
    return u_c @ (u_c.T @ w)


@torch.no_grad()
def kasa_reference(e: Env, adapters: AdapterSet) -> torch.nn.Module:
    """The base with ``W − (its dropped rank-r part) + s·B diag(d) A`` written densely."""
    ref = copy.deepcopy(e.model)
    for name, layer in adapters.items():
        w = ref.get_submodule(name).weight
        dropped = minor_piece(w.double(), layer.opts.rank, layer.opts, e.covs[name])
        update = (layer.B.double() * (layer.d.double() * layer.scale)) @ layer.A.double()
        w.copy_((w.double() - dropped + update).float())
    return ref


PUBLISHED = {"kasa": {"select": "weight"}}  # the paper's choice (KaSA's default takes the calibration inputs at hand)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_init_fold_and_peft_export(method, arch, env, tmp_path):
    check_init_fold_and_export(env(arch), method, tmp_path, **PUBLISHED.get(method, {}))


@pytest.mark.parametrize("method, options", [
    ("kore", {"freeze_a": True}), ("pissa", {"niter": 4}), ("sorsa", {"niter": 4}), ("svfit", {"niter": 2}),
    ("salt", {"ratio": 0.25}), ("kasa", {"alpha": 3.0, "select": "weight"}), ("corda-kpa", {"damp": 0.5}),
    ("kasa", {"select": "activation"}), ("milora", {"select": "activation"}),
    ("soma", {"select": "activation", "damp": 0.0}), ("osft", {"energy": 0.5})])
def test_option_variants(method, options, env, tmp_path):
    check_init_fold_and_export(env("phi3"), method, tmp_path, **options)


def check_init_fold_and_export(e: Env, method: str, tmp_path: Path, **options) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, adapters = create(e, method, RANK, **options)
    init = logits(model, e.ids)
    if method == "kasa":
        assert gap(init, e.base_logits) > 10 * TOL  # the truncation is real ...
        assert gap(init, logits(kasa_reference(e, adapters), e.ids)) <= TOL  # ... and exactly the minor part
    else:
        assert gap(init, e.base_logits) <= TOL

    perturb(adapters)
    adapted = logits(model, e.ids)
    assert gap(adapted, e.base_logits) > 1e-2  # the perturbation reaches the output
    if method == "kasa":
        assert gap(adapted, logits(kasa_reference(e, adapters), e.ids)) <= TOL

    adapters.save(tmp_path / "adapter")
    fold(e.path, tmp_path / "adapter", tmp_path / "folded")
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", dtype=torch.float32).eval()
    assert gap(logits(folded, e.ids), adapted) <= TOL

    report = export("peft", e.path, [tmp_path / "adapter"], tmp_path / "peft")
    entry = report["adapters"]["adapter"]
    assert entry["max_rel_error"] == 0.0 and entry["max_logit_gap"] <= TOL
    peft_model = PeftModel.from_pretrained(load_base(e.path), tmp_path / "peft").eval()
    assert gap(logits(peft_model, e.ids), adapted) <= TOL

    # exported rank: uniform R = the largest exact rank, each module within its method's bound
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    bounds = {name: layer.rank_bound() for name, layer in adapters.items()}
    assert config["r"] == config["lora_alpha"] == entry["rank"] <= max(bounds.values())
    assert entry["bound"] == max(bounds.values())
    for name, bound in bounds.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert a.shape[0] == config["r"]
        assert int((a.abs().sum(1) > 0).sum()) <= bound


@pytest.mark.parametrize("method", ["kasa", "pissa", "svf", "salt", "corda-kpa"])
def test_max_rank_reports_its_error(method, env, tmp_path):
    e = env("llama")
    _, adapters = create(e, method, RANK)
    perturb(adapters)
    adapters.save(tmp_path / "adapter")
    k = 3
    report = export("peft", e.path, [tmp_path / "adapter"], tmp_path / "peft", max_rank=k, verify=False)
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    errors = {}
    for name, layer in adapters.items():
        a, b = layer.delta()
        dense = b.double() @ a.double()
        a2 = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        b2 = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        assert a2.shape[0] <= k
        errors[name] = float(torch.linalg.norm(dense - b2 @ a2) / torch.linalg.norm(dense))
        # the truncation is the best rank-k one (Eckart–Young): the tail of the singular values
        s = torch.linalg.svdvals(dense)
        assert errors[name] == pytest.approx(float(s[k:].norm() / s.norm()), abs=1e-5)
    assert report["adapters"]["adapter"]["max_rel_error"] == pytest.approx(max(errors.values()), abs=1e-5)
    assert max(errors.values()) > 1e-3  # rank k really truncates here


def expected_piece(method: str, w: torch.Tensor, cov: torch.Tensor, opts, scale: float = 1.0,
                   fisher: torch.Tensor | None = None) -> torch.Tensor:
    """What the method's paper takes out of (or keeps of) ``W`` at init, densely in float64."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = RANK
    if method == "olora":  # s·Q[:, :r] R[:r] of the full QR
        q, rr = torch.linalg.qr(w)
        return scale * q[:, :r] @ rr[:r]
    if method.startswith("corda"):  # the r first (IPA) or last (KPA) triplets of W C, times C⁻¹
        fixed, inv = (t.double() for t in damped_inverse(cov, CorDAOptions.damp))
        u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
        picked = slice(0, r) if method == "corda-ipa" else slice(-r, None)
        return (u[:, picked] * s[picked]) @ vh[picked] @ inv
    if method == "loku":  # FILA: the best rank-r approximation in the Fisher-weighted norm
        d = (fisher + 0.01 * fisher.mean()).sqrt()
        u, s, vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r]) / d[:, None]
    if method in ("pissa", "sorsa", "svfit"):
        return (u[:, :r] * s[:r]) @ vh[:r]
    if method in ("milora", "soma"):
        return minor_piece(w, r, opts, cov)
    if method in ("svf", "salt"):
        return w
    if method == "kore":
        null = torch.linalg.eigh(cov)[1][:, :r]  # eigenvectors of the r smallest eigenvalues
        return w @ null @ null.T
    raise AssertionError(method)


@pytest.mark.parametrize("method, options", [
    *[(m, {}) for m in ["pissa", "milora", "soma", "sorsa", "svfit", "svf", "salt", "kore", "olora", "corda-ipa",
                        "corda-kpa", "loku"]],
    ("milora", {"select": "activation"}), ("soma", {"select": "activation", "damp": 0.0})])
def test_initial_component_is_the_documented_one(method, options, env):
    e = env("phi3")
    _, adapters = create(e, method, RANK, **options)
    for name, layer in adapters.items():
        w = e.model.get_submodule(name).weight.detach().double()
        if method in ("svfit", "svf"):
            piece = (layer.U.double() * layer.sigma0.double()) @ layer.Vh.double()
        elif method == "salt":
            piece = (layer.U.double() * layer.S.double()) @ layer.Vh.double()
        else:
            a, b = layer.frozen_factors()
            piece = -(b.double() @ a.double())
        expected = expected_piece(method, w, e.covs[name].double(), layer.opts,
                                  layer.scale if method == "olora" else 1.0, e.fisher[name])
        size = float(torch.linalg.matrix_norm(w, 2))
        if method.startswith("corda"):  # a piece of W C, mapped back through C⁻¹
            fixed, inv = (t.double() for t in damped_inverse(e.covs[name], layer.opts.damp))
            size = float(torch.linalg.matrix_norm(w @ fixed, 2) * torch.linalg.matrix_norm(inv, 2))
        assert (piece - expected).abs().max() <= 1e-5 * size, name
