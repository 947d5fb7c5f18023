"""DiffoRA against its equations: the relaxed gate ``ΔW_i = σ(α_i)·s·B_i A_i``, the top-k
discretisation across all modules of a set (ties to the earlier module, kept updates unchanged,
switched-off modules exactly zero), a training run that takes the decision and exports it exactly,
and resume across the decision."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import adapter_tensors, make_adapter, max_diff, write_jsonl
from safetensors.torch import load_file

from svd_serve.adapter import AdapterConfig, AdapterSet, make_options
from svd_serve.errors import SvdServeError
from svd_serve.export import export
from svd_serve.methods.diffora import DiffoRA
from svd_serve.training import TrainConfig, train

SHAPES = [(12, 8), (8, 12), (10, 10), (16, 6), (9, 7)]


def dense(lr) -> torch.Tensor:
    return lr.B.double() @ lr.A.double()


def random_set(logits: list[float], keep: float = 0.5, search: float = 0.25, seed: int = 0) -> AdapterSet:
    """A DiffoRA set over modules of different shapes, random factors, the given gate logits."""
    config = AdapterConfig(method="diffora", options={"rank": 2, "alpha": 3.0, "keep": keep, "search": search},
                           targets={f"m{i}": list(s) for i, s in enumerate(SHAPES[: len(logits)])},
                           target_spec="", architecture="", base_fingerprint="")
    adapters = AdapterSet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, layer), logit in zip(adapters.items(), logits):
            layer.A.copy_(torch.randn(layer.A.shape, generator=g))
            layer.B.copy_(torch.randn(layer.B.shape, generator=g))
            layer.logit.fill_(logit)
    return adapters


def test_relaxed_gate_is_sigmoid_of_the_logit():
    adapters = random_set([0.7, -1.3])
    for _, layer in adapters.items():
        a, b, alpha = layer.A.detach().double(), layer.B.detach().double(), float(layer.logit.detach())
        want = (1 / (1 + torch.exp(torch.tensor(-alpha, dtype=torch.float64)))) * (3.0 / 2) * b @ a
        torch.testing.assert_close(dense(layer.delta()), want, rtol=1e-6, atol=1e-7)
        # the gate is learned jointly: d⟨G, ΔW⟩/dα = σ'(α)·s·⟨G, B A⟩
        grad = torch.randn(layer.m, layer.n, dtype=torch.float64)
        layer.zero_grad()
        (dense(layer.trainable_factors()) * grad).sum().backward()
        s = torch.sigmoid(torch.tensor(alpha, dtype=torch.float64))
        want_grad = s * (1 - s) * 1.5 * (grad * (b @ a)).sum()
        assert abs(float(layer.logit.grad) - float(want_grad)) <= 1e-5 * abs(float(want_grad))


def test_kept_count_and_decision_step():
    assert [DiffoRA.kept(n, keep) for n, keep in [(10, 0.3), (5, 0.5), (4, 0.1), (7, 0.99), (210, 0.25)]] == \
        [3, 3, 1, 7, 53]
    assert [DiffoRA.decision_step(total, s) for total, s in [(6, 0.5), (1, 0.25), (10, 0.25), (100, 0.3)]] == \
        [3, 1, 3, 30]


def test_top_k_discretisation_across_all_modules():
    logits = [0.3, -1.0, 2.0, 0.3, 0.5]
    adapters = random_set(logits, keep=0.5, search=0.25)  # k = 3 of 5; decision after update 3 of 12
    before = {name: dense(layer.delta()) for name, layer in adapters.items()}
    adapters.after_step(2, 12)
    assert all(float(layer.decided) == 0 for _, layer in adapters.items())  # still searching: unchanged
    assert all(torch.equal(dense(layer.delta()), before[name]) for name, layer in adapters.items())

    adapters.after_step(3, 12)
    kept = {name for name, layer in adapters.items() if float(layer.on) == 1}
    assert kept == {"m2", "m4", "m0"}  # 2.0, 0.5, then the tie at 0.3 goes to the earlier module
    for name, layer in adapters.items():
        assert float(layer.decided) == 1
        delta = dense(layer.delta())
        if name in kept:  # the gate is folded into B: the same ΔW, with γ = 1 from now on
            torch.testing.assert_close(delta, before[name], rtol=1e-6, atol=1e-6)
            assert float(layer.gate()) == 1.0 and layer.rank_bound() == 2
        else:
            assert torch.count_nonzero(delta) == 0 and layer.rank_bound() == 0
            assert torch.count_nonzero(layer.B) > 0  # exactly zero by the gate, whatever B holds

    decided = {k: v.clone() for k, v in adapters.state_dict().items()}
    with torch.no_grad():
        adapters.layers["m1"].logit.fill_(10.0)  # a later change of the logits decides nothing again
    adapters.after_step(4, 12)
    assert float(adapters.layers["m1"].on) == 0
    assert all(torch.equal(decided[k], v) for k, v in adapters.state_dict().items() if not k.endswith("logit"))


def run_cfg(tiny_model, data, out, **kw) -> TrainConfig:
    base = dict(base=str(tiny_model("llama")), data=str(data), out=str(out), method="diffora", targets="all-linear",
                options={"keep": 0.25, "search": 0.5}, steps=4, lr=1e-2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_training_decides_and_exports_exactly(tiny_model, qa_data, tmp_path):
    out = train(run_cfg(tiny_model, qa_data, tmp_path / "run"))
    adapters = AdapterSet.load(out)
    layers = dict(adapters.items())
    assert len(layers) == 14  # 7 Linear modules in each of 2 layers
    assert all(float(layer.decided) == 1 for layer in layers.values())
    on = [name for name, layer in layers.items() if float(layer.on) == 1]
    assert len(on) == DiffoRA.kept(14, 0.25) == 4
    for name, layer in layers.items():
        nonzero = torch.count_nonzero(dense(layer.delta()))
        assert (nonzero > 0) if name in on else (nonzero == 0), name

    report = export("peft", tiny_model("llama"), [out], tmp_path / "peft")
    entry = report["adapters"]["run"]
    assert entry["max_rel_error"] == 0.0 and entry["max_logit_gap"] <= 1e-4 and entry["rank"] == 8
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for name in layers:  # switched-off modules are written as zero modules
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert (torch.count_nonzero(b) > 0) == (name in on), name


def test_resume_across_the_decision_is_exact(tiny_model, qa_data, tmp_path):
    ref = train(run_cfg(tiny_model, qa_data, tmp_path / "ref", steps=6, save_every=2, warmup=1))
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")  # continue from step 2, before the decision at 3
    for name in ("svd_adapter.json", "svd_adapter.safetensors"):
        (resumed / name).unlink()
    before = adapter_tensors(resumed / "checkpoints" / "step-2")
    assert all(float(v) == 0 for k, v in before.items() if k.endswith(".decided"))
    train(run_cfg(tiny_model, qa_data, resumed, steps=6, save_every=2, warmup=1, resume=True))
    assert max_diff(ref, resumed) <= 1e-6
    assert sum(float(v) for k, v in adapter_tensors(ref).items() if k.endswith(".on")) == 4


@pytest.mark.parametrize("bad", [{"keep": 1.0}, {"keep": 0.0}, {"search": 1.5}])
def test_options_are_checked(bad):
    with pytest.raises(SvdServeError, match=f"option {next(iter(bad))} must be"):
        make_options("diffora", **bad)


def decided_adapter(base, out) -> tuple[object, list[str]]:
    """A DiffoRA adapter over all-linear modules, as if trained, after its decision: the modules
    kept, and the adapter saved at ``out``."""
    path = make_adapter(base, out.with_name(out.name + "-search"), "diffora", targets="all-linear", scale=0.1)
    adapters = AdapterSet.load(path)
    adapters.after_step(1, 4)  # search = 0.25 of 4 steps: the decision
    kept = [name for name, layer in adapters.items() if float(layer.on) == 1]
    assert 0 < len(kept) < len(dict(adapters.items()))
    return adapters.save(out), kept


@pytest.mark.onnx
def test_switched_off_modules_run_in_onnx_runtime(tiny_model, tmp_path, run_cli):
    base = tiny_model("llama")
    adapter, _ = decided_adapter(base, tmp_path / "diffora")
    code, out = run_cli("export", "--target", "onnx", "--base", base, "--adapter", adapter, "--out", tmp_path / "exp",
                        "--dtype", "float32")
    assert code == 0, out
    code, out = run_cli("verify", "--target", "onnx", "--base", base, "--export", tmp_path / "exp",
                        "--max-new-tokens", "4", "--json", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and set(report["checks"]) == {"(base)", "diffora"}
    assert report["checks"]["diffora"]["max_logprob_gap"] <= 1e-3



@pytest.mark.slow
def test_smollm2_few_steps(tmp_path):
    """Two steps on the real model (short rows): the decision over its 60 q/v modules, exported exactly."""
    from svd_serve.realmodel import smollm2

    base = smollm2()
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"}
                                                 for a in range(3) for b in range(3)])
    out = train(TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "run"), method="diffora",
                            targets="q_proj,v_proj", options={"keep": 0.25, "search": 0.5}, steps=2, batch_size=4,
                            lr=1e-3, progress=False))
    layers = dict(AdapterSet.load(out).items())
    on = [name for name, layer in layers.items() if float(layer.on) == 1]
    assert len(layers) == 60 and len(on) == DiffoRA.kept(60, 0.25) == 15
    assert all((torch.count_nonzero(dense(layer.delta())) > 0) == (name in on) for name, layer in layers.items())
    report = export("peft", base, [out], tmp_path / "peft", check_logits=True)
    entry = report["adapters"]["run"]
    assert entry["max_rel_error"] == 0.0 and entry["rank"] == 8 and entry["max_logit_gap"] <= 1e-3
