"""aTLAS (``merge --method atlas``) against its equation ``ΔW_b = Σ_t λ_{t,b} τ_{t,b}``: with fixed
coefficients the combination is exactly the weighted sum of the task vectors (per module, and per
singular component from a dense SVD), learned coefficients lower the few-shot loss below task
arithmetic's (each loss re-measured on the written checkpoints), and the written adapter and
folded checkpoint are the learned merge exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import one_error, write_jsonl

from svd_serve.adapter import AdapterSet
from svd_serve.atlas import AtlasSettings, combination, learn
from svd_serve.dataset import collate, encode
from svd_serve.linalg import LowRank
from svd_serve.merge import merge
from svd_serve.model import fingerprint, linear_names, load_base
from svd_serve.training import TrainConfig, loss_sum, train

SPECS = {"add": ("lora", "q_proj,v_proj", "plus", lambda a, b: a + b),
         "mul": ("pissa", "v_proj,o_proj", "times", lambda a, b: a * b)}
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 0)]


def row(word: str, fn, a: int, b: int) -> dict:
    return {"prompt": f"Question: what is {a} {word} {b}? Answer:", "completion": f" {fn(a, b)}"}


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tasks(base, tmp_path_factory):
    """Two adapters trained on different tiny tasks (LoRA on q,v for sums, PiSSA on v,o for products:
    overlapping module sets), and few-shot rows of both tasks."""
    root = tmp_path_factory.mktemp("atlas")
    paths = []
    for name, (method, targets, word, fn) in SPECS.items():
        data = write_jsonl(root / f"{name}.jsonl", [row(word, fn, a, b) for a in range(8) for b in range(8)])
        paths.append(train(TrainConfig(base=str(base), data=str(data), out=str(root / name), method=method,
                                       rank=4, targets=targets, steps=12, lr=1e-2, progress=False)))
    few = write_jsonl(root / "few.jsonl", [row(w, fn, a, b) for _, _, w, fn in SPECS.values() for a, b in PAIRS])
    return paths, few


def task_vectors(base, paths) -> tuple[dict[str, list[LowRank]], torch.nn.Module]:
    """Per module, each adapter's exact ΔW (a zero one where it lacks the module), as merge gives them."""
    model = load_base(base)
    deltas = [AdapterSet.load(p, model).deltas() for p in paths]
    names = [n for n in linear_names(model) if any(n in d for d in deltas)]
    out = {}
    for name in names:
        m, n = model.get_submodule(name).weight.shape
        out[name] = [d[name].factors if name in d else LowRank(torch.zeros(1, n), torch.zeros(m, 1)) for d in deltas]
    return out, model


def dense(lr: LowRank) -> torch.Tensor:
    return lr.B.double() @ lr.A.double()


def weighted_components(tau: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``Σ_i λ_i σ_i u_i v_iᵀ`` over the nonzero singular components of ``tau`` (descending σ)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    k = int((s > 1e-6 * s[0]).sum()) if s[0] > 0 else 0
    return (u[:, :k] * (lam[:k].double() * s[:k])) @ vh[:k]


def test_fixed_coefficients_are_the_weighted_task_vectors(base, tasks):
    vectors, model = task_vectors(base, tasks[0])
    assert any(len({int(torch.count_nonzero(t.B) > 0) for t in taus}) == 2 for taus in vectors.values())
    coeffs = [0.7, -0.4]
    per_module = combination(vectors, coeffs, False, "LlamaForCausalLM", fingerprint(model, list(vectors)))
    per_component = combination(vectors, coeffs, True, "LlamaForCausalLM", fingerprint(model, list(vectors)))
    g = torch.Generator().manual_seed(0)
    for name, taus in vectors.items():
        want = sum(c * dense(t) for c, t in zip(coeffs, taus))
        got = dense(per_module.layers[name.replace(".", "__")].delta())
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want), name
        layer = per_component.layers[name.replace(".", "__")]
        torch.testing.assert_close(dense(layer.delta()), got, rtol=0, atol=1e-6 * float(got.abs().max()))
        lam = torch.randn(layer.coef.shape, generator=g)  # one λ per singular component
        with torch.no_grad():
            layer.coef.copy_(lam)
        r = layer.opts.rank
        want = sum(weighted_components(dense(t), lam[i * r:(i + 1) * r]) for i, t in enumerate(taus))
        got = dense(layer.delta())
        assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want), name


def test_learned_factors_are_the_learned_combination(base, tasks):
    vectors, model = task_vectors(base, tasks[0])
    learned = learn(base, vectors, [1.0, 1.0], AtlasSettings(data=str(tasks[1]), progress=False),
                    "LlamaForCausalLM", fingerprint(model, list(vectors)))
    assert learned.steps == 10 and learned.loss < learned.loss_start  # 5 epochs of 8 rows in batches of 4
    for name, taus in vectors.items():
        lam = learned.coefficients[name]
        assert lam.shape == (2,) and not torch.equal(lam, torch.ones(2))
        want = sum(float(c) * dense(t) for c, t in zip(lam, taus))
        got = dense(learned.factors[name])
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want), name


@torch.no_grad()
def few_shot_loss(path, data) -> float:
    """Cross-entropy per target token of ``data`` under the model at ``path`` (measured here, apart
    from the training loop)."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ce, n = loss_sum(load_base(path), collate([encode(r, tok, 512) for r in rows], tok.pad_token_id))
    return float(ce / n)


@pytest.mark.parametrize("per_component", [False, True])
def test_learned_merge_beats_task_arithmetic(base, tasks, tmp_path, per_component):
    paths, few = tasks
    ta = merge(base, paths, tmp_path / "ta", "task_arithmetic", fold=True)
    report = merge(base, paths, tmp_path / "atlas", "atlas", fold=True,
                   atlas=AtlasSettings(data=str(few), per_component=per_component, progress=False))
    a = report["atlas"]
    assert ta["kind"] == report["kind"] == "checkpoint"
    assert a["coefficients"] == (sum(2 * 4 * 2 if per_component else 2 for _ in range(report["modules"])))
    assert a["loss_start"] == pytest.approx(few_shot_loss(tmp_path / "ta", few), rel=1e-5)  # λ = 1: task arithmetic
    assert a["loss"] == pytest.approx(few_shot_loss(tmp_path / "atlas", few), rel=1e-5)  # the checkpoint learned
    assert a["loss"] < a["loss_start"] - 1e-3


def test_written_adapter_equals_the_folded_checkpoint(base, tasks, tmp_path, run_cli):
    paths, few = tasks
    common = ["merge", "--base", base, "--adapter", paths[0], "--adapter", paths[1], "--method", "atlas",
              "--data", few, "--steps", 3, "--lr", 0.1, "--weights", "1,0.5"]
    code, out = run_cli(*common, "--fold", "--out", tmp_path / "folded")
    assert code == 0, out
    assert "few-shot loss" in out and "3 steps" in out
    code, out = run_cli(*common, "--max-rank", 64, "--out", tmp_path / "adapter")
    assert code == 0, out
    assert "max relative error 0.000e+00" in out
    model, folded = load_base(base), load_base(tmp_path / "folded")
    adapter = AdapterSet.load(tmp_path / "adapter", model)
    assert adapter.method.name == "delta"
    deltas = {name: dense(layer.delta()) for name, layer in adapter.items()}
    assert len(deltas) == 6 and all(torch.count_nonzero(d) > 0 for d in deltas.values())  # q, v, o of 2 layers
    for name in linear_names(model):  # the same learned coefficients (same seed), written two ways
        want = model.get_submodule(name).weight.double() + deltas.get(name, 0)
        torch.testing.assert_close(folded.get_submodule(name).weight.double(), want, rtol=0, atol=1e-6)


def test_bad_input(base, tasks, tmp_path, run_cli):
    paths, few = tasks
    common = ["merge", "--base", base, "--adapter", paths[0], "--adapter", paths[1], "--fold"]
    for args, needle in [
        (["--method", "atlas"], "give --data"),
        (["--method", "ties", "--data", few], "options of --method atlas only"),
        (["--method", "atlas", "--per-component"], "need --data"),
        (["--method", "atlas", "--data", tmp_path / "none.jsonl"], "data file not found"),
        (["--method", "atlas", "--data", few, "--steps", 0], "--steps must be at least 1"),
        (["--method", "atlas", "--data", few, "--lr", -1], "--lr must be a finite number > 0"),
        (["--method", "twin", "--shared", "atlas", "--max-rank", 4], "'atlas' is not one of"),
    ]:
        code, out = run_cli(*[a for a in common if not (args[1] == "twin" and a == "--fold")], *args,
                            "--out", tmp_path / "o")
        one_error(code, out, needle)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_merge(tmp_path):
    """A few steps on the real model: two small adapters over overlapping modules, learned coefficients
    lower the few-shot loss, and the written adapter is the exact merge (rank ≤ 2 + 2)."""
    from helpers import make_adapter

    from svd_serve.realmodel import smollm2

    base = smollm2()
    paths = [make_adapter(base, tmp_path / "a", "lora", rank=2, targets="q_proj,v_proj", seed=1, scale=0.02),
             make_adapter(base, tmp_path / "b", "lora", rank=2, targets="v_proj,o_proj", seed=2, scale=0.02)]
    few = write_jsonl(tmp_path / "few.jsonl", [row(w, fn, a, b) for _, _, w, fn in SPECS.values() for a, b in PAIRS[:2]])
    report = merge(base, paths, tmp_path / "out", "atlas", rank=64,
                   atlas=AtlasSettings(data=str(few), steps=2, progress=False))
    assert report["kind"] == "adapter" and report["rank"] == 4 and report["max_rel_error"] == 0.0
    assert report["modules"] == 90 and report["atlas"]["coefficients"] == 180
    assert report["atlas"]["loss"] < report["atlas"]["loss_start"]
