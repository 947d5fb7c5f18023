"""``svd-serve merge``: every method against a reference on a tiny model (mergekit's own TIES/DARE,
dense re-implementations of TSV and KnOTS from the papers' formulas), Twin-Merging end to end, and
bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from svd_serve.adapter import AdapterSet, make_options
from svd_serve.merge import MERGES, MergeParams
from svd_serve.model import linear_names, load_base, resolve_targets

import mergekit.merge_methods.registry as mergekit  # noqa: E402  (a dev dependency: missing fails, never skips)
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SPECS = [("kasa", "q_proj,v_proj"), ("pissa", "q_proj,k_proj"), ("lora", "v_proj,o_proj")]


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three adapters of different methods over overlapping module sets, with random trained values."""
    root = tmp_path_factory.mktemp("adapters")
    model = load_base(base)
    paths = []
    for i, (method, targets) in enumerate(SPECS):
        torch.manual_seed(i)
        s = AdapterSet.create(model, method, make_options(method, rank=4), resolve_targets(model, targets),
                              progress=False)
        with torch.no_grad():
            for p in s.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        paths.append(s.save(root / f"task{i}"))
    return paths


def task_vectors(base, paths) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """Each adapter's dense τ per module (float32, computed as the merger does), the module order."""
    model = load_base(base)
    taus = [{n: d.B @ d.A for n, d in AdapterSet.load(p, model).deltas().items()} for p in paths]
    modules = [n for n in linear_names(model) if any(n in t for t in taus)]
    return modules, taus


def dense_of(path, base_model) -> dict[str, torch.Tensor]:
    return {n: (lambda a, b: b.double() @ a.double())(*layer.delta())
            for n, layer in AdapterSet.load(path, base_model).items()}


def test_task_arithmetic_and_linear_exact(base, adapters, run_cli, tmp_path):
    model = load_base(base)
    taus = [dense_of(p, model) for p in adapters]
    w = [0.7, 0.3, -0.5]
    code, out = run_cli("merge", "--base", base, *sum((["--adapter", p] for p in adapters), []),
                        "--method", "task_arithmetic", "--weights", "0.7,0.3,-0.5", "--lambda", "0.8",
                        "--max-rank", 64, "--out", tmp_path / "ta")
    assert code == 0, out
    merged = dense_of(tmp_path / "ta", model)
    assert AdapterSet.load(tmp_path / "ta").method.name == "delta"
    assert set(merged) == set().union(*taus)
    for name, got in merged.items():
        want = 0.8 * sum(wi * t.get(name, 0) for wi, t in zip(w, taus))
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)

    code, out = run_cli("merge", "--base", base, "--adapter", adapters[0], "--adapter", adapters[2],
                        "--method", "linear", "--weights", "3,1", "--fold", "--out", tmp_path / "lin")
    assert code == 0, out
    folded = load_base(tmp_path / "lin")
    assert (tmp_path / "lin" / "tokenizer.json").is_file()
    for name in linear_names(model):
        want = model.get_submodule(name).weight.double()
        want = want + 0.75 * taus[0].get(name, 0) + 0.25 * taus[2].get(name, 0)
        torch.testing.assert_close(folded.get_submodule(name).weight.double(), want, rtol=0, atol=1e-6)


def mergekit_delta(method: str, taus: list[torch.Tensor], weights, density) -> torch.Tensor:
    """mergekit's own merge of one tensor, base 0 (so its task vectors are exactly ours)."""
    ids = [f"t{i}" for i in range(len(taus))]
    group = TensorGroup.from_tensors([torch.zeros_like(taus[0]), *taus], ids=["base", *ids], base_index=0)
    spec = mergekit.get(method)
    params = {p.name: p.default for p in spec.spec.parameters if p.name not in ("weight", "density")}
    return spec.merge_group(group, weight=dict(zip(ids, weights)), density=dict.fromkeys(ids, density),
                            **params)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_dare_match_mergekit(base, adapters, run_cli, tmp_path, method):
    modules, taus = task_vectors(base, adapters)
    weights, density, seed = [1.0, 0.6, 0.8], 0.4, 7
    code, out = run_cli("merge", "--base", base, *sum((["--adapter", p] for p in adapters), []),
                        "--method", method, "--weights", "1,0.6,0.8", "--density", density,
                        "--seed", seed, "--fold", "--out", tmp_path / "m")
    assert code == 0, out
    model, folded = load_base(base), load_base(tmp_path / "m")
    torch.manual_seed(seed)  # mergekit draws DARE masks from the global RNG, module by module, task by task
    for name in modules:
        w0 = model.get_submodule(name).weight
        want = mergekit_delta(method, [t.get(name, torch.zeros_like(w0)) for t in taus], weights, density)
        got = folded.get_submodule(name).weight - w0
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        if method != "dare_linear":
            assert (want == 0).any()  # the trimming / election really removed entries


def random_factors(seed: int, m=24, n=20, ranks=(3, 4, 2)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)) for r in ranks]


def polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def test_tsv_matches_dense_reference():
    """TSV-M from its formula on dense matrices: top ⌊k/T⌋ (nonzero) triplets of each τ_t,
    U_c and V_c replaced by P Qᵀ, ΔW = α Û Σ_c V̂ᵀ."""
    deltas, w = random_factors(0), [1.0, 0.5, 2.0]
    got = (lambda a, b: b.double() @ a.double())(*MERGES["tsv"](deltas, MergeParams(weights=w, lam=0.9)))
    keep = 20 // 3
    us, ss, vs = [], [], []
    for (a, b), wi in zip(deltas, w):
        u, s, vh = torch.linalg.svd(wi * b.double() @ a.double())
        r = min(keep, int((s > 1e-6 * s[0]).sum()))
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vh[:r].T)
    want = 0.9 * polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
    assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want)
    # one task alone: TSV gives it back unchanged
    (a, b), = deltas[:1]
    one = MERGES["tsv"]([(a, b)], MergeParams(weights=[1.0]))
    torch.testing.assert_close(one[1] @ one[0], b @ a, rtol=0, atol=1e-5)


def test_knots_matches_dense_reference():
    """KnOTS-TIES: SVD of [τ_1 … τ_T] = U S [V_1ᵀ … V_Tᵀ]; mergekit's TIES over S V_tᵀ; ΔW = U · merged."""
    deltas, w, density = random_factors(1), [1.0, 0.7, 1.3], 0.5
    a, b = MERGES["knots"](deltas, MergeParams(weights=w, density=density))
    got = b.double() @ a.double()
    u, s, vh = torch.linalg.svd(torch.cat([bi @ ai for ai, bi in deltas], 1).double(), full_matrices=False)
    r = int((s > 1e-6 * s[0]).sum())
    coeffs = [(s[:r, None] * vh[:r, t * 20:(t + 1) * 20]).float() for t in range(3)]
    want = u[:, :r] @ mergekit_delta("ties", coeffs, w, density).double()
    assert torch.linalg.norm(got - want) <= 1e-4 * torch.linalg.norm(want)
    # with density 1 and agreeing signs impossible to guarantee, at least: linear merge of one task is exact
    (a1, b1), = deltas[:1]
    one = MERGES["knots"]([(a1, b1)], MergeParams(weights=[1.0]))
    torch.testing.assert_close(one[1] @ one[0], b1 @ a1, rtol=0, atol=1e-5)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def test_twin(base, adapters, run_cli, tmp_path):
    """New base + task t's adapter = task t's twin model θ* + SVD_K(τ_t − ΔW*); at full rank it is
    the task model itself; the adapters load against the new base and export."""
    from svd_serve.export import export

    pair = adapters[:2]
    modules, taus = task_vectors(base, pair)
    for rank, name in ((3, "low"), (64, "full")):
        code, out = run_cli("merge", "--base", base, "--adapter", pair[0], "--adapter", pair[1],
                            "--method", "twin", "--density", "0.5", "--max-rank", rank, "--out", tmp_path / name)
        assert code == 0, out
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model = load_base(base)
    shared = {}
    for n in modules:
        z = torch.zeros_like(model.get_submodule(n).weight)
        shared[n] = mergekit_delta("ties", [t.get(n, z) for t in taus], [1.0, 1.0], 0.5)
    new_base = load_base(tmp_path / "low" / "base")
    for n in modules:
        torch.testing.assert_close(new_base.get_submodule(n).weight,
                                   model.get_submodule(n).weight + shared[n], rtol=0, atol=2e-6)
    for t, path in enumerate(pair):
        task = Path(path).name
        # the twin model, built densely: θ0 + ΔW* + best rank-3 approximation of τ_t − ΔW*
        twin = load_base(base)
        with torch.no_grad():
            for n in modules:
                u, s, vh = torch.linalg.svd((taus[t].get(n, 0) - shared[n]).double())
                w = twin.get_submodule(n).weight
                w += shared[n] + ((u[:, :3] * s[:3]) @ vh[:3]).float()
        served = load_base(tmp_path / "low" / "base")
        AdapterSet.load(tmp_path / "low" / "adapters" / task, served).attach(served)
        assert (logits(served, ids) - logits(twin, ids)).abs().max() <= 1e-4
        # full rank: new base + adapter = the original task model
        task_model = load_base(base)
        AdapterSet.load(path, task_model).attach(task_model)
        served = load_base(tmp_path / "full" / "base")
        AdapterSet.load(tmp_path / "full" / "adapters" / task, served).attach(served)
        assert (logits(served, ids) - logits(task_model, ids)).abs().max() <= 1e-4
    report = export("peft", tmp_path / "low" / "base", [tmp_path / "low" / "adapters" / Path(pair[0]).name],
                    tmp_path / "exported")
    assert max(e["max_logit_gap"] for e in report["adapters"].values()) <= 1e-4


def test_bad_input(base, adapters, run_cli, tmp_path, tiny_model):
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-base", "llama", seed=1)
    model = load_base(other)
    foreign = AdapterSet.create(model, "lora", make_options("lora", rank=4),
                                resolve_targets(model, "q_proj"), progress=False).save(tmp_path / "foreign")
    two = ["--base", base, "--adapter", adapters[0], "--adapter", adapters[1]]
    cases = [
        (["--base", base, "--adapter", adapters[0], "--adapter", foreign, "--method", "linear", "--fold"],
         "different base"),
        ([*two, "--method", "ties", "--weights", "1,2,3", "--fold"], "3 values for 2 adapters"),
        ([*two, "--method", "ties", "--density", "0", "--fold"], "(0, 1]"),
        ([*two, "--method", "dare_ties", "--density", "1.5", "--max-rank", "4"], "(0, 1]"),
        ([*two, "--method", "linear", "--fold", "--max-rank", "4"], "exactly one of"),
        ([*two, "--method", "twin", "--fold"], "--rank"),
    ]
    for args, message in cases:
        out_dir = tmp_path / "out"
        code, out = run_cli("merge", *args, "--out", out_dir)
        assert code == 2, out
        lines = [ln for ln in out.splitlines() if ln.strip() and "Loading weights" not in ln]  # transformers' bar
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out
        assert not out_dir.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
