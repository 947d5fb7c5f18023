"""Adapters written against a quantized served base (svd_serve/served.py, ``export --served-base``):
the closed form against brute force, its errors on the calibration inputs measured independently,
exactness at full rank, the checks of the served base, and the written PEFT and vLLM exports."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import invoke, one_error, write_jsonl


@pytest.fixture(scope="module")
def s(tiny_model, trained_adapter, qa_data, tmp_path_factory):
    """The tiny llama, its W4A16 copy, a KaSA adapter, 16 calibration rows and their statistics."""
    from svd_serve.adapter import AdapterSet
    from svd_serve.dataset import read_jsonl
    from svd_serve.quant import quantize_checkpoint
    from svd_serve.served import adapter_rank, calibration
    from svd_serve.weights import Weights

    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("served")
    served = quantize_checkpoint(base, tmp / "w4a16", "W4A16")
    calib = write_jsonl(tmp / "calib.jsonl", read_jsonl(qa_data)[::4])
    full = Weights(base)
    adapters = AdapterSet.load(trained_adapter, full)
    deltas = {n: d.factors for n, d in adapters.deltas().items()}
    covs = calibration(calib, base, list(deltas), deltas)
    return SimpleNamespace(base=base, tmp=tmp, served=served, calib=calib, full=full, adapters=adapters,
                           deltas=deltas, covs=covs, r=adapter_rank(adapters), adapter=trained_adapter)


@pytest.fixture(scope="module")
def aware(s):
    from svd_serve.served import aware_factors
    from svd_serve.weights import Weights

    return aware_factors(s.full, Weights(s.served), s.deltas, s.covs, extra_rank=s.r)


@torch.no_grad()
def calib_inputs(s) -> dict[str, torch.Tensor]:
    """Every target module's inputs [N, n] over the calibration rows, of the full-precision adapted model."""
    from svd_serve.dataset import encode, read_jsonl
    from svd_serve.model import LowRankDelta, attach, load_base, load_tokenizer

    model, tok = load_base(s.base), load_tokenizer(s.base)
    attach(model, {n: LowRankDelta(*d) for n, d in s.deltas.items()})
    xs: dict[str, list] = {n: [] for n in s.deltas}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in s.deltas]
    for row in read_jsonl(s.calib):
        model(input_ids=torch.tensor([encode(row, tok, 512).input_ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


@torch.no_grad()
def test_aware_beats_plain_on_the_calibration_inputs(s, aware):
    """Every module: the output error on the served base, measured on the actual calibration inputs
    (not the second moment the report uses), is what the report says, and the aware one is below the
    plain one; ranks are each module's exact rank plus r; W4A16 is at the expected distance."""
    from svd_serve.linalg import exact_rank, factored_svd
    from svd_serve.model import load_base

    factors, report = aware
    served = dict(load_base(s.served).named_modules())
    xs = calib_inputs(s)
    assert set(factors) == set(s.deltas) == set(report["modules"])
    for name, f in factors.items():
        m = report["modules"][name]
        w = s.full.weight(name).double()
        wq = served[name].weight.double()
        d = s.deltas[name].dense().double()
        x = xs[name].T
        adapted = (w + d) @ x
        plain = (adapted - (wq + d) @ x).norm() / adapted.norm()
        got = (adapted - (wq + f.factors.dense().double()) @ x).norm() / adapted.norm()
        assert m["plain"] == pytest.approx(float(plain), rel=1e-6)
        assert m["aware"] == pytest.approx(float(got), rel=1e-5)
        assert got < plain
        assert f.rank == m["rank"] == exact_rank(factored_svd(*s.deltas[name])[1]) + s.r
        assert 0.02 < m["distance"] < 0.2  # int4 RTN: about 0.1 of ‖W‖
    assert report["total"]["aware"] < report["total"]["plain"]
    assert report["served_base"]["quantization"]["bits"] == 4


@torch.no_grad()
def test_enough_rank_reproduces_the_adapted_model(s):
    """With K ≥ rank(M) the served base plus the factors is the adapted model: per module on the
    calibration inputs, and end to end (logits against the adapted model whose target modules are
    full precision; the adapter's targets are q_proj and v_proj, the other quantized Linears are
    the served ones on both sides)."""
    from svd_serve.model import LowRankDelta, attach, load_base
    from svd_serve.served import aware_factors
    from svd_serve.weights import Weights

    factors, report = aware_factors(s.full, Weights(s.served), s.deltas, s.covs, max_rank=64)
    assert max(m["aware"] for m in report["modules"].values()) < 1e-5
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = load_base(s.served)
    with torch.no_grad():
        for name in s.deltas:
            ref.get_submodule(name).weight.copy_(s.full.weight(name))
    s.adapters.attach(ref)
    want = ref(input_ids=ids).logits
    served = load_base(s.served)
    attach(served, {n: LowRankDelta(*f.factors) for n, f in factors.items()})
    got = served(input_ids=ids).logits
    plain = load_base(s.served)
    attach(plain, {n: LowRankDelta(*d) for n, d in s.deltas.items()})
    gap_plain = float((plain(input_ids=ids).logits - want).abs().max())
    gap = float((got - want).abs().max())
    assert gap < 2e-4 * float(want.abs().max()), (gap, gap_plain)
    assert gap_plain > 100 * gap


def test_closed_form_is_the_optimum():
    """A small module: the closed form equals the best of many alternating least-squares runs (no
    damping), and no random perturbation of its factors lowers the damped objective it minimises."""
    from svd_serve.linalg import LowRank, Weighting
    from svd_serve.served import ServedModule, aware_module

    g = torch.Generator().manual_seed(0)
    m, n, k = 7, 6, 2
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    e = 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    delta = LowRank(torch.randn(1, n, generator=g), torch.randn(m, 1, generator=g))
    x = torch.randn(n, 50, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)[:, None]
    cov = x @ x.T / 50
    target = delta.dense().double() + e

    def objective(approx: torch.Tensor, c: torch.Tensor) -> float:
        diff = target - approx
        return float(((diff @ c) * diff).sum())

    exact, _ = aware_module(delta, ServedModule(w, e), cov, k, damp=0.0)
    assert exact.rank == k
    best = float("inf")
    for seed in range(5):
        a = torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(300):
            b = target @ cov @ a.T @ torch.linalg.inv(a @ cov @ a.T)
            a = torch.linalg.solve(b.T @ b, b.T @ target)
        best = min(best, objective(b @ a, cov))
    assert objective(exact.factors.dense().double(), cov) == pytest.approx(best, rel=1e-6)

    damped, _ = aware_module(delta, ServedModule(w, e), cov, k)
    c = Weighting.activation(cov).cols
    cd = c @ c.T  # the damped second moment the default minimises
    a0, b0 = damped.factors.A.double(), damped.factors.B.double()
    f0 = objective(b0 @ a0, cd)
    for seed in range(20):
        pg = torch.Generator().manual_seed(100 + seed)
        pa, pb = torch.randn(a0.shape, generator=pg, dtype=torch.float64), torch.randn(b0.shape, generator=pg, dtype=torch.float64)
        for eps in (1e-3, 1e-2):
            assert objective((b0 + eps * pb) @ (a0 + eps * pa), cd) >= f0 * (1 - 1e-9)


def test_served_base_checks(s, tiny_model):
    """Another model of the same shapes, another architecture, a format nobody reads, and
    --served-base without --calib-data: one clear error each, before any calibration."""
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(s.tmp / "other", "llama", seed=1)
    unknown = shutil.copytree(s.base, s.tmp / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mystery"}}))
    common = ("export", "--target", "peft", "--base", s.base, "--adapter", s.adapter, "--calib-data", s.calib)
    one_error(*invoke(*common, "--out", s.tmp / "x1", "--served-base", other), "another model", "q_proj")
    one_error(*invoke(*common, "--out", s.tmp / "x2", "--served-base", tiny_model("qwen2")), "--served-base", "Qwen2")
    one_error(*invoke(*common, "--out", s.tmp / "x3", "--served-base", unknown), "--served-base", "mystery")
    one_error(*invoke("export", "--target", "peft", "--base", s.base, "--adapter", s.adapter, "--out", s.tmp / "x4",
                      "--served-base", s.served), "--served-base needs --calib-data")
    assert not any((s.tmp / f"x{i}").exists() for i in range(1, 5))


@pytest.mark.parametrize("target", ["peft", "vllm"])
def test_export_writes_the_aware_factors(s, aware, target):
    """The written LoRA (as a PEFT reader applies it) is the aware factors; the record names the served
    base (path, quantization, the fingerprint of its dequantized weights) and has every module's errors;
    vLLM's serve command serves the quantized checkpoint."""
    from svd_serve.converters.peft import read_lora
    from svd_serve.model import fingerprint, load_base

    factors, report = aware
    out = s.tmp / f"export-{target}"
    code, output = invoke("export", "--target", target, "--base", s.base, "--adapter", s.adapter, "--out", out,
                          "--served-base", s.served, "--calib-data", s.calib)
    assert code == 0, output
    assert "aware" in output and "written vs aware factors" in output
    lora = out if target == "peft" else out / s.adapter.name
    read = read_lora(lora)
    assert set(read) == set(factors)
    for name, f in factors.items():
        want = f.factors.dense().double()
        assert float((read[name].dense().double() - want).norm() / want.norm()) < 1e-6
    record = json.loads((lora / "svd_serve_export.json").read_text())["served_base"]
    assert record["served_base"]["path"] == str(s.served.resolve())
    assert record["served_base"]["fingerprint"] == fingerprint(load_base(s.served), list(factors))
    assert record["served_base"]["quantization"]["format"] == "pack-quantized"
    for name, m in record["modules"].items():
        assert m["aware"] == pytest.approx(report["modules"][name]["aware"], rel=1e-9)
    if target == "vllm":
        serve = json.loads((out / "serve.json").read_text())
        assert serve["base"] == str(s.served.resolve())
        assert serve["command"][serve["command"].index("--model") + 1] == str(s.served.resolve())
        assert serve["adapters"][s.adapter.name]["served_base"]["total"] == record["total"]


def test_vllm_plugin_converts_aware_of_the_served_base(s, aware, monkeypatch, tmp_path):
    """With SVD_SERVE_SERVED_BASE and SVD_SERVE_CALIB_DATA the plugin writes the aware factors, in a cache
    entry of their own (not the exact conversion's); without the calibration rows it refuses."""
    from svd_serve.converters import vllm_plugin as plugin
    from svd_serve.converters.peft import read_lora
    from svd_serve.errors import SvdServeError

    factors, _ = aware
    monkeypatch.setenv(plugin.SERVED_ENV, str(s.served))
    with pytest.raises(SvdServeError, match=plugin.CALIB_ENV):
        plugin.convert(s.adapter, tmp_path, "kasa", str(s.served))
    monkeypatch.setenv(plugin.CALIB_ENV, str(s.calib))
    out = plugin.convert(s.adapter, tmp_path, "kasa", str(s.served))
    assert "-served-" in out.name
    read = read_lora(out)
    for name, f in factors.items():
        want = f.factors.dense().double()
        assert float((read[name].dense().double() - want).norm() / want.norm()) < 1e-6
    monkeypatch.delenv(plugin.SERVED_ENV)
    exact = plugin.convert(s.adapter, tmp_path, "kasa", str(s.base))
    assert exact != out and "-served-" not in exact.name
