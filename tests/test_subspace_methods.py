"""Methods whose trained subspace is not one fixed rank-r pair, against references written from their
papers' equations: CoDyRA prunes its rank (the proximal step, and the per-module ranks it leaves,
written by every exporter), SST re-samples its singular vectors (one step: enhanced gradient,
sampling by singular value, re-factorisation, optimizer state reset), OSFT trains orthogonally to a
kept subspace (projected gradient, ΔW orthogonal to it); training on the tiny model and on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import MAX_LOGIT_GAP, adapter_tensors, create, folded, gap, logits, max_diff, perturb, train_two_processes
from safetensors.torch import load_file

from svd_serve.adapter import AdapterSet, make_options
from svd_serve.converters import vllm as vllm_conv
from svd_serve.export import export
from svd_serve.methods import METHODS
from svd_serve.methods.codyra import CoDyRA
from svd_serve.methods.lora import LoRA
from svd_serve.methods.osft import OSFT
from svd_serve.methods.sst import SST
from svd_serve.model import load_base
from svd_serve.training import TrainConfig, train

TOL = MAX_LOGIT_GAP[torch.float32]


def run(tiny_model, data, out, method, **kw):
    base = dict(base=str(tiny_model("llama")), data=str(data), out=str(out), method=method, steps=4, lr=1e-2,
                batch_size=4, progress=False)
    return train(TrainConfig(**{**base, **kw}))


def dense(lowrank) -> torch.Tensor:
    return lowrank.B.double() @ lowrank.A.double()


def surrogate_step(layer, g: torch.Tensor, lr: float) -> None:
    """One SGD step on L = ⟨G, ΔW⟩ (so ∂L/∂W' = G), the gradient through the layer's own factors."""
    for p in layer.parameters():
        p.grad = None
    (g * layer.trainable_factors().dense()).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p -= lr * p.grad


# --- CoDyRA -------------------------------------------------------------------------------------------
def test_codyra_prunes_by_soft_thresholding():
    """Proximal step of κ_t·Σ|w_i| (soft-thresholding), κ_t = 0 for the first half, then linear to κ."""
    layer = CoDyRA(6, 5, make_options("codyra", rank=4, kappa=0.1, dense=0.5))
    w = torch.tensor([0.5, -0.03, 0.02, -0.3])
    layer.w.data.copy_(w)
    for step in (1, 5):  # dense phase: 5 of 10 steps
        layer.after_step(step, 10)
        assert torch.equal(layer.w.detach(), w)
    layer.after_step(7, 10)  # κ_7 = 0.1 · (7 − 5) / (10 − 5) = 0.04
    assert torch.allclose(layer.w.detach(), torch.tensor([0.46, 0.0, 0.0, -0.26]), atol=1e-7)
    layer.after_step(10, 10)  # κ_10 = 0.1
    assert torch.allclose(layer.w.detach(), torch.tensor([0.36, 0.0, 0.0, -0.16]), atol=1e-7)
    assert layer.active_rank == 2
    assert layer.w.detach()[1] == 0 and layer.w.detach()[2] == 0  # exactly zero, not small


def test_codyra_delta_is_b_diag_w_a():
    layer = CoDyRA(7, 5, make_options("codyra", rank=3))
    layer.init(torch.randn(7, 5))
    assert layer.delta().dense().abs().max() == 0  # B = 0 at init
    perturb(layer)
    want = layer.B.double() @ torch.diag(layer.w.double()) @ layer.A.double()
    assert torch.allclose(dense(layer.delta()), want, atol=1e-12)


@pytest.fixture(scope="module")
def mixed_ranks(tiny_model, tmp_path_factory):
    """A CoDyRA adapter on every linear layer of tiny Llama whose modules kept 1 to 6 of 6 components."""
    tmp = tmp_path_factory.mktemp("codyra")
    base = tiny_model("llama")
    model = load_base(base)
    from svd_serve.model import resolve_targets

    names = resolve_targets(model, "all-linear")
    adapters = AdapterSet.create(model, "codyra", make_options("codyra", rank=6), names, "all-linear", progress=False)
    perturb(adapters, scale=0.1)
    ranks = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(adapters.items()):
            keep = 1 + i % 6
            layer.w[keep:] = 0  # as pruning leaves it
            ranks[name] = keep
    adapters.save(tmp / "codyra")
    return {"base": base, "tmp": tmp, "adapter": tmp / "codyra", "ranks": ranks}


def test_codyra_module_ranks_in_peft_and_vllm(mixed_ranks, tmp_path):
    from peft import PeftModel

    base, ranks = mixed_ranks["base"], mixed_ranks["ranks"]
    report = export("peft", base, [mixed_ranks["adapter"]], tmp_path / "peft")
    entry = report["adapters"]["codyra"]
    assert entry["rank"] == max(ranks.values()) == 6 and entry["max_rel_error"] == 0.0
    assert entry["max_logit_gap"] <= TOL
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert config["r"] == config["lora_alpha"] == 6
    for name, rank in ranks.items():  # each module at its own rank, zero-padded to the largest
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert int((a.abs().sum(1) > 0).sum()) == int((b.abs().sum(0) > 0).sum()) == rank, name
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = logits(folded(base, mixed_ranks["adapter"]), ids)
    peft_model = PeftModel.from_pretrained(load_base(base), tmp_path / "peft").eval()
    assert gap(logits(peft_model, ids), reference) <= TOL
    assert gap(reference, logits(load_base(base), ids)) > 1e-2

    report = export("vllm", base, [mixed_ranks["adapter"]], tmp_path / "vllm", verify=False)
    serve = json.loads((tmp_path / "vllm" / "serve.json").read_text())
    assert serve["adapters"]["codyra"]["rank"] == max(ranks.values())  # the largest module rank ...
    assert serve["max_lora_rank"] == vllm_conv.max_lora_rank(6) == 8  # ... the smallest --max-lora-rank above it


@pytest.mark.onnx
def test_codyra_module_ranks_in_onnx(mixed_ranks, run_cli):
    """Each module's own rank symbol takes the module's rank; the session equals the folded model."""
    import numpy as np
    import onnxruntime as ort

    from svd_serve.converters.onnx import check_adapter, prefill_feed, session_options

    out = mixed_ranks["tmp"] / "onnx"
    code, text = run_cli("export", "--target", "onnx", "--base", mixed_ranks["base"], "--adapter",
                         mixed_ranks["adapter"], "--out", out, "--dtype", "float32")
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())["adapters"]["codyra"]
    assert manifest["ranks"] == mixed_ranks["ranks"] and manifest["rank"] == 6
    params = ort.AdapterFormat.read_adapter(str(out / "adapters" / "codyra.onnx_adapter")).get_parameters()
    for name, rank in mixed_ranks["ranks"].items():
        assert params[f"{name}.lora_A.weight"].numpy().shape[1] == rank  # [in, r]: no padding in ONNX
    sess = ort.InferenceSession(str(out / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(check_adapter(out, "codyra")))
    opts = ort.RunOptions()
    opts.add_active_adapter(lora)
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    got = sess.run(["logits"], prefill_feed(out, sess, ids), opts)[0]
    want = logits(folded(mixed_ranks["base"], mixed_ranks["adapter"]), torch.from_numpy(ids)).numpy()
    assert np.abs(got - want).max() <= TOL


def test_codyra_training_prunes_each_module_its_own_way(tiny_model, qa_data, tmp_path):
    out = run(tiny_model, qa_data, tmp_path / "o", "codyra", steps=6, targets="all-linear",
              options={"kappa": 0.5, "rank": 6})
    adapters = AdapterSet.load(out)
    active = {name: layer.active_rank for name, layer in adapters.items()}
    assert min(active.values()) < 6 and len(set(active.values())) > 1, active  # pruned, per module
    deltas = adapters.deltas()
    for name, layer in adapters.items():
        assert deltas[name].rank == layer.active_rank, name  # the exported rank is the surviving components


# --- SST ----------------------------------------------------------------------------------------------
def sst_layer(m=7, n=5, rank=2, **options) -> SST:
    layer = SST(m, n, make_options("sst", rank=rank, **options))
    layer.init(torch.randn(m, n, generator=torch.Generator().manual_seed(0)))
    return layer


def sst_weight(layer: SST) -> torch.Tensor:
    """``U diag(σ) Vᵀ``, the layer's current weight, densely."""
    u, vh = layer.current()
    return (u.double() * layer.sigma.detach().double()) @ vh.double()


def same(params, expected) -> bool:
    return [id(p) for p in params] == [id(p) for p in expected]


def test_sst_starts_at_the_svd_of_w():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    layer = sst_layer()
    assert torch.allclose(sst_weight(layer), w.double(), atol=1e-5)
    assert dense(layer.delta()).abs().max() <= 1e-12  # ΔW = UΣVᵀ − U0Σ0V0ᵀ: zero at init (the same factors)
    assert torch.equal(layer.Us.detach(), layer.U[:, layer.idx]) and torch.equal(layer.Vs.detach(), layer.Vh[layer.idx])


def test_sst_step_is_the_papers_update():
    """Σ takes its gradient diag(Uᵀ G V); the sampled u_i, v_i take the enhanced gradient G v_i, Gᵀ u_i
    (without σ_i); the other vectors do not move; ΔW is the new U Σ Vᵀ minus the initial one."""
    layer, lr = sst_layer(), 0.1
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    u, s, vh, idx = layer.U.clone(), layer.sigma.detach().clone(), layer.Vh.clone(), layer.idx.clone()
    w0 = (layer.U0 * layer.sigma0) @ layer.Vh0
    surrogate_step(layer, g, lr)
    assert torch.allclose(layer.sigma.grad, torch.diag(u.T @ g @ vh.T), atol=1e-6)
    assert torch.allclose(layer.Us.grad, g @ vh[idx].T, atol=1e-6)
    assert torch.allclose(layer.Vs.grad, u[:, idx].T @ g, atol=1e-6)
    u_ref, vh_ref = u.clone(), vh.clone()
    u_ref[:, idx] -= lr * g @ vh[idx].T
    vh_ref[idx] -= lr * u[:, idx].T @ g
    s_ref = s - lr * torch.diag(u.T @ g @ vh.T)
    layer.after_step(1, 10)  # writes the sampled vectors back, samples anew (sample_every=1)
    assert torch.allclose(layer.U, u_ref, atol=1e-6) and torch.allclose(layer.Vh, vh_ref, atol=1e-6)
    assert torch.allclose(layer.sigma.detach(), s_ref, atol=1e-6)
    want = (u_ref * s_ref) @ vh_ref - w0
    assert torch.allclose(dense(layer.delta()), want.double(), atol=1e-5)
    assert same(layer.pop_stale(), [layer.Us, layer.Vs])  # new vectors: their Adam state is reset
    assert torch.equal(layer.Us.detach(), layer.U[:, layer.idx])


def test_sst_samples_by_singular_value():
    layer = sst_layer(m=6, n=4, rank=1)
    layer.sigma.data.copy_(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    draws = torch.cat([layer.sample(step) for step in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64), atol=0.03), freq
    assert torch.equal(layer.sample(7), layer.sample(7))  # a function of (seed, step): resume draws the same
    layer2 = sst_layer(m=6, n=4, rank=3)
    picks = layer2.sample(3)
    assert len(set(picks.tolist())) == 3  # without replacement


def test_sst_keeps_vectors_between_samplings():
    layer = sst_layer(sample_every=3)
    idx = layer.idx.clone()
    for step in (1, 2):
        layer.after_step(step, 10)
        assert torch.equal(layer.idx, idx) and layer.pop_stale() == []  # Adam's moments carry on
    layer.after_step(3, 10)
    assert same(layer.pop_stale(), [layer.Us, layer.Vs])


def test_sst_refactorisation_keeps_delta_and_restores_orthonormal_factors():
    layer = sst_layer(m=8, n=6, rank=2, refactor_every=4)
    perturb(layer, scale=0.2)  # training moves U and V off orthonormality
    before = dense(layer.delta())
    layer.after_step(4, 10)
    assert torch.allclose(dense(layer.delta()), before, atol=1e-5)
    eye = torch.eye(6)
    assert torch.allclose(layer.U.T @ layer.U, eye, atol=1e-5) and torch.allclose(layer.Vh @ layer.Vh.T, eye, atol=1e-5)
    s = layer.sigma.detach()
    assert (s >= 0).all() and (s[:-1] >= s[1:]).all()
    assert same(layer.pop_stale(), [layer.sigma, layer.Us, layer.Vs])


def test_sst_trains_and_resumes_exactly(tiny_model, qa_data, tmp_path):
    """Sampling, write-back, a re-factorisation after the checkpoint and the reset optimizer state all
    resume exactly; the adapter moved and ΔW stays exact."""
    options = {"refactor_every": 3}
    out = run(tiny_model, qa_data, tmp_path / "o", "sst", save_every=2, keep_checkpoints=5, options=options)
    first = tmp_path / "first"
    first.mkdir()
    for name in ("svd_adapter.json", "svd_adapter.safetensors"):
        (first / name).write_bytes((out / name).read_bytes())
    run(tiny_model, qa_data, out, "sst", save_every=2, keep_checkpoints=5, options=options, resume=True)
    assert max_diff(first, out) <= 1e-6
    tensors = adapter_tensors(out)
    moved = max((tensors[k] - tensors[k.replace("sigma", "sigma0")]).abs().max() for k in tensors
                if k.endswith(".sigma"))
    assert moved > 1e-3
    metrics = [r for line in (out / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["step"] > 0]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]


def test_sst_two_processes_equal_one(tiny_model, text_data, tmp_path, run_cli):
    """Every rank draws the same sample and re-factorises the same way (2 processes × batch 2 = batch 4)."""
    args = ["train", "--base", tiny_model("llama"), "--data", text_data, "--method", "sst", "--steps", 3,
            "--lr", 1e-2, "-o", "refactor_every=2", "--no-progress"]
    code, output = run_cli(*args, "--batch-size", 4, "--out", tmp_path / "one")
    assert code == 0, output
    train_two_processes(args, tmp_path / "two")
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-4


class Resetting(LoRA):
    """LoRA whose B has its optimizer state dropped after every step."""

    name = "resetting"

    def after_step(self, step, total_steps):
        self.reset_optimizer_state(self.B)


def test_reset_optimizer_state_restarts_adam(tiny_model, qa_data, tmp_path, monkeypatch):
    """A fresh Adam state makes every step a first step: lr · g / |g| per entry (bias correction from
    step 1), so with a constant lr each entry of B (from 0) ends at an odd multiple of lr. Without the
    reset the later steps are not ± lr."""
    monkeypatch.setitem(METHODS, "resetting", Resetting)
    lr = 1e-2
    runs = {}
    for method in ("resetting", "lora"):
        out = run(tiny_model, qa_data, tmp_path / method, method, steps=3, lr=lr, schedule="constant",
                  max_grad_norm=0)
        b = torch.cat([v.flatten() for k, v in adapter_tensors(out).items() if k.endswith(".B")]) / lr
        runs[method] = (b.abs() - 1) / 2  # 0 or 1 for ±1 and ±3
    off = {m: float(((r - r.round()).abs() > 1e-4).double().mean()) for m, r in runs.items()}
    assert off["resetting"] <= 0.05  # (1.4 %: entries whose |g| is within a few decades of Adam's ε move less)
    assert off["lora"] >= 0.9  # (100 %)


# --- OSFT ---------------------------------------------------------------------------------------------
def osft_layer(m=9, n=7, energy=0.6) -> tuple[OSFT, torch.Tensor]:
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * torch.linspace(2, 0.2, n)
    layer = OSFT(m, n, make_options("osft", energy=energy))
    layer.init(w)
    return layer, w


def test_osft_keeps_the_fewest_components_holding_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # σ² = 9, 4, 1, 1 of 15
    assert [OSFT.kept(s, e) for e in (0.5, 0.6, 0.86, 0.87, 0.99)] == [1, 1, 2, 3, 3]  # never all k
    layer, w = osft_layer()
    power = torch.linalg.svdvals(w.double()).square()
    kh = int(layer.high)
    assert power[:kh].sum() >= 0.6 * power.sum() > power[:kh - 1].sum()
    assert layer.rank_bound() == 7 - kh
    assert dense(layer.delta()).abs().max() <= 1e-6  # zero at init (to rounding)


def test_osft_gradient_is_projected_off_the_kept_subspace():
    """The paper's update: ∇U_low ← (I − U_high U_highᵀ)∇U_low, ∇V_low ← ∇V_low(I − V_highᵀV_high), with
    ∇U_low = G V_lowᵀ Σ_low and ∇V_low = Σ_low U_lowᵀ G; the kept triplets get no gradient."""
    layer, _ = osft_layer()
    kh, lr = int(layer.high), 0.05
    g = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    u_h, vh_h = layer.U0[:, :kh], layer.Vh0[:kh]
    u_l, s_l, vh_l = layer.U0[:, kh:], layer.S0[kh:], layer.Vh0[kh:]
    grad_u = (torch.eye(9) - u_h @ u_h.T) @ g @ vh_l.T * s_l
    grad_vh = s_l[:, None] * u_l.T @ g @ (torch.eye(7) - vh_h.T @ vh_h)
    surrogate_step(layer, g, lr)
    assert torch.allclose(layer.U.grad[:, kh:], grad_u, atol=1e-5)
    assert torch.allclose(layer.Vh.grad[kh:], grad_vh, atol=1e-5)
    assert torch.allclose(layer.S.grad[kh:], torch.diag(u_l.T @ g @ vh_l.T), atol=1e-5)
    assert layer.U.grad[:, :kh].abs().max() == 0 and layer.S.grad[:kh].abs().max() == 0
    after = (u_l - lr * grad_u) * (s_l - lr * torch.diag(u_l.T @ g @ vh_l.T)) @ (vh_l - lr * grad_vh)
    assert torch.allclose(dense(layer.delta()), (after - (u_l * s_l) @ vh_l).double(), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_osft_delta_is_orthogonal_to_the_kept_subspace(seed):
    """Whatever the parameters (here random), U_highᵀ ΔW = 0 and ΔW V_high = 0, so rank ΔW ≤ k − k_high."""
    layer, _ = osft_layer()
    perturb(layer, seed=seed, scale=0.3)
    kh = int(layer.high)
    delta = dense(layer.delta())
    norm = torch.linalg.norm(delta)
    assert norm > 0.1
    assert torch.linalg.norm(layer.U0[:, :kh].double().T @ delta) <= 1e-6 * norm
    assert torch.linalg.norm(delta @ layer.Vh0[:kh].double().T) <= 1e-6 * norm
    sigma = torch.linalg.svdvals(delta)
    assert int((sigma > 1e-6 * sigma[0]).sum()) == layer.rank_bound() == 7 - kh


def test_osft_trains_within_the_complement(tiny_model, qa_data, tmp_path):
    out = run(tiny_model, qa_data, tmp_path / "o", "osft", targets="all-linear")
    model = load_base(tiny_model("llama"))
    records = [r for line in (out / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["step"] > 0]
    assert records[-1]["loss"] < records[0]["loss"]
    for name, layer in AdapterSet.load(out, model).items():
        kh = int(layer.high)
        delta = dense(layer.delta())
        norm = torch.linalg.norm(delta)
        assert norm > 0, name
        assert torch.linalg.norm(layer.U0[:, :kh].double().T @ delta) <= 1e-5 * norm, name
        assert torch.linalg.norm(delta @ layer.Vh0[:kh].double().T) <= 1e-5 * norm, name


# --- full-rank ΔW: exact, or truncated with its error -------------------------------------------------
@pytest.mark.parametrize("method", ["sst", "osft"])
def test_full_rank_export_is_exact_or_reports_its_error(method, env, tmp_path, run_cli):
    e = env("llama")
    model, adapters = create(e, method)
    perturb(adapters)
    adapters.save(tmp_path / "adapter")
    exact = export("peft", e.path, [tmp_path / "adapter"], tmp_path / "exact")["adapters"]["adapter"]
    assert exact["max_rel_error"] == 0.0 and exact["max_logit_gap"] <= TOL
    assert exact["rank"] == exact["bound"] == max(layer.rank_bound() for _, layer in adapters.items())
    k = 4
    cut = export("peft", e.path, [tmp_path / "adapter"], tmp_path / "cut", max_rank=k)["adapters"]["adapter"]
    errors = []
    for name, layer in adapters.items():
        s = torch.linalg.svdvals(dense(layer.delta()))
        errors.append(float(s[k:].norm() / s.norm()))  # Eckart–Young: the best rank-k error
    assert cut["rank"] == k and cut["max_rel_error"] == pytest.approx(max(errors), abs=1e-5) and max(errors) > 0.1
    # the folded model, extracted at the same rank, has the same error
    code, out = run_cli("fold", "--base", e.path, "--adapter", tmp_path / "adapter", "--out", tmp_path / "folded")
    assert code == 0, out
    code, out = run_cli("extract", "--base", e.path, "--finetuned", tmp_path / "folded", "--max-rank", k,
                        "--targets", "all-linear", "--out", tmp_path / "extracted")
    assert code == 0, out
    extracted = AdapterSet.load(tmp_path / "extracted")
    for (name, layer), want in zip(adapters.items(), errors):
        s_all = torch.linalg.svdvals(dense(layer.delta()))
        got = torch.linalg.norm(dense(extracted.layers[name.replace(".", "__")].delta()) - dense(layer.delta()))
        assert float(got / s_all.norm()) == pytest.approx(want, abs=1e-4), name


# --- SmolLM2 ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["codyra", "sst", "osft"])
def test_trains_on_smollm2(method, tmp_path):
    """A few steps on the real model's chat rows: finite losses, the adapter moved, ΔW exact (fold =
    adapted model)."""
    from pathlib import Path

    from svd_serve.realmodel import smollm2

    base = smollm2()
    data = Path(__file__).parents[1] / "examples" / "chat" / "train.jsonl"
    out = train(TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "o"), method=method, steps=3,
                            batch_size=2, max_length=64, lr=1e-3, progress=False,
                            options={"sample_every": 1, "refactor_every": 2} if method == "sst" else {}))
    records = [r for line in (out / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["step"] > 0]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    model = load_base(base)
    adapters = AdapterSet.load(out, model)
    assert max(float(dense(layer.delta()).abs().max()) for _, layer in adapters.items()) > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    adapted = logits(adapters.attach(model), ids)
    adapters.detach(model)
    assert gap(logits(folded(base, out), ids), adapted) <= TOL
