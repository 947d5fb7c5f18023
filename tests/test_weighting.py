"""Weighted truncation wherever svd-serve lowers a rank (export, merge and its twin residuals, extract):
``--weighting none|fisher|activation`` over ``--calib-data``, each module's Frobenius and output error
reported. The factor-space math itself is tested against dense SVDs in test_linalg.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import make_adapter, one_error, write_jsonl

from svd_serve.adapter import AdapterSet
from svd_serve.dataset import encode, read_jsonl
from svd_serve.export import export
from svd_serve.extract import extract
from svd_serve.fold import fold
from svd_serve.merge import merge
from svd_serve.model import load_base, load_tokenizer

RANK, K = 4, 2
RTOL = 1e-4  # float32 factors and model statistics against a float64 dense reference


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("weighting")
    return base, [make_adapter(base, tmp / f"task{i}", "lora", RANK, "all-linear", seed=i, scale=0.2)
                  for i in range(2)]


@pytest.fixture(scope="module")
def calib(qa_data, tmp_path_factory) -> Path:
    """12 calibration rows (of the 64 sums)."""
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", read_jsonl(qa_data)[::5][:12])


def module_inputs(model_dir, rows, names, adapter=None) -> dict[str, torch.Tensor]:
    """Every input vector of each module over the rows (one row at a time), float64 ``[N, n]``: the
    reference the reported output errors are checked against."""
    model, tok = load_base(model_dir), load_tokenizer(model_dir)
    if adapter is not None:
        AdapterSet.load(adapter, model).attach(model)
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: xs[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([encode(row, tok, 512).input_ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(x) for n, x in xs.items()}


def dense_truncation(delta: torch.Tensor, x: torch.Tensor, k: int, damp: float = 0.01) -> torch.Tensor:
    """The best rank-k approximation of ``delta`` in ``‖E S‖_F`` with ``S Sᵀ = XᵀX/N + damp·mean·I``,
    from a dense SVD (the reference of ``--weighting activation``)."""
    cov = x.T @ x / x.shape[0]
    lam, vecs = torch.linalg.eigh(cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype))
    s_root = vecs * lam.sqrt()
    u, s, vh = torch.linalg.svd(delta @ s_root)
    return (u[:, :k] * s[:k]) @ vh[:k] @ torch.linalg.inv(s_root)


def output_error(delta, approx, x) -> float:
    return float(torch.linalg.norm((delta - approx) @ x.T) / torch.linalg.norm(delta @ x.T))


def test_export_activation_weighting_is_the_output_optimal_truncation(adapters, calib, tmp_path):
    """The reported errors are those of the best rank-K approximation in the (damped) output norm of the
    adapted model's inputs, checked against a dense reference; the output error never exceeds the plain
    truncation's, the Frobenius error never falls below it."""
    base, (adapter, _) = adapters
    rows = read_jsonl(calib)
    runs = {w: export("peft", base, [adapter], tmp_path / w, max_rank=K, weighting=w, calib_data=calib)
            ["adapters"][adapter.name] for w in ("none", "activation")}
    exact = {n: d.factors for n, d in AdapterSet.load(adapter).deltas().items()}
    xs = module_inputs(base, rows, list(exact), adapter)
    for name, f in exact.items():
        delta = f.B.double() @ f.A.double()
        best = dense_truncation(delta, xs[name], K)
        frob, out = runs["activation"]["errors"][name]
        assert out == pytest.approx(output_error(delta, best, xs[name]), rel=RTOL), name
        assert frob == pytest.approx(float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta)), rel=RTOL)
        plain_frob, plain_out = runs["none"]["errors"][name]
        s = torch.linalg.svdvals(delta)
        assert plain_frob == pytest.approx(float(s[K:].norm() / s.norm()), rel=RTOL)  # Eckart–Young
        assert out <= plain_out * (1 + 1e-6) and frob >= plain_frob * (1 - 1e-6)
    gains = [runs["none"]["errors"][n][1] / runs["activation"]["errors"][n][1] for n in exact]
    assert max(gains) > 1.05  # on a real adapter the weighting changes the choice


def test_fisher_weighting_lowers_the_fisher_weighted_error(adapters, calib, tmp_path):
    """``--weighting fisher``: per module the error in the Fisher-weighted norm (FWSVD's objective) is
    at most the plain truncation's; the weights are the adapted model's Fisher rows."""
    from svd_serve.calib import truncation_weights
    from svd_serve.linalg import Weighting, relative_error

    base, (adapter, _) = adapters
    report = export("peft", base, [adapter], tmp_path / "f", max_rank=K, weighting="fisher",
                    calib_data=calib)["adapters"][adapter.name]
    exact = {n: d.factors for n, d in AdapterSet.load(adapter).deltas().items()}
    stats = truncation_weights("fisher", calib, base, list(exact), exact)
    for name, f in exact.items():
        w = Weighting.fisher(stats.fisher[name])
        weighted, plain = stats.compress(name, f, K), dataclasses.replace(stats, kind="none").compress(name, f, K)
        assert relative_error(f, weighted.factors, w) <= relative_error(f, plain.factors, w) * (1 + 1e-6)
        assert report["errors"][name] == pytest.approx([weighted.rel_error, weighted.output_error], rel=RTOL)


def test_merge_twin_and_extract_take_the_weighting(adapters, calib, tmp_path, run_cli):
    """Every other command that lowers a rank: merge --max-rank (statistics of the base), the twin
    residuals, extract from a fine-tune (statistics of the fine-tune); activation never loses more
    output than plain, and the CLI prints the per-module-type table."""
    base, dirs = adapters
    for kind in ("adapter", "twin"):
        runs = {w: merge(base, dirs, tmp_path / f"{kind}-{w}", "task_arithmetic" if kind == "adapter" else "twin",
                         rank=K, shared="task_arithmetic", weighting=w, calib_data=calib) for w in ("none", "activation")}
        reports = ([(runs[w], w) for w in runs] if kind == "adapter"
                   else [(runs[w]["adapters"][d.name], w) for w in runs for d in dirs])
        by = {}
        for r, w in reports:
            by.setdefault(w, []).append(r["errors"])
        for plain, weighted in zip(by["none"], by["activation"]):
            assert plain.keys() == weighted.keys() and len(plain) == 14
            assert all(weighted[n][1] <= plain[n][1] * (1 + 1e-6) for n in plain)
    fold(base, dirs[0], tmp_path / "finetune")
    runs = {w: extract(base, tmp_path / "finetune", tmp_path / f"x-{w}", rank=K, weighting=w, calib_data=calib)
            for w in ("none", "activation")}
    xs = module_inputs(tmp_path / "finetune", read_jsonl(calib), list(runs["none"]["errors"]))
    tuned, original = load_base(tmp_path / "finetune").requires_grad_(False), load_base(base).requires_grad_(False)
    for name, (frob, out) in runs["activation"]["errors"].items():
        diff = tuned.get_submodule(name).weight.double() - original.get_submodule(name).weight.double()
        assert out == pytest.approx(output_error(diff, dense_truncation(diff, xs[name], K), xs[name]), rel=RTOL), name
        assert out <= runs["none"]["errors"][name][1] * (1 + 1e-6), name
        assert frob >= runs["none"]["errors"][name][0] * (1 - 1e-6), name
    code, output = run_cli("extract", "--base", base, "--finetuned", tmp_path / "finetune", "--max-rank", K,
                           "--weighting", "activation", "--calib-data", calib, "--out", tmp_path / "x-cli")
    assert code == 0, output
    assert "with --weighting activation" in output and "q_proj" in output and "down_proj" in output


def test_bad_weighting_inputs(adapters, calib, tmp_path, run_cli):
    base, dirs = adapters
    cases = [
        (["export", "--target", "peft", "--base", base, "--adapter", dirs[0], "--max-rank", 2, "--weighting", "fisher"],
         "--weighting fisher needs --calib-data"),
        (["export", "--target", "peft", "--base", base, "--adapter", dirs[0], "--calib-data", calib],
         "they go with --max-rank"),
        (["export", "--target", "peft", "--base", base, "--adapter", dirs[0], "--max-rank", 2, "--calib-data",
          tmp_path / "missing.jsonl"], "data file not found"),
        (["merge", "--base", base, "--adapter", dirs[0], "--adapter", dirs[1], "--method", "linear", "--fold",
          "--weighting", "activation", "--calib-data", calib], "they go with --max-rank"),
        (["extract", "--base", base, "--finetuned", base, "--max-rank", 2, "--weighting", "activation"],
         "--weighting activation needs --calib-data"),
    ]
    for i, (args, message) in enumerate(cases):
        code, output = run_cli(*args, "--out", tmp_path / f"o{i}")
        one_error(code, output, message)
        assert not (tmp_path / f"o{i}").exists()
