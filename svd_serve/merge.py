"""``svd-serve merge``: several adapters of one base → one folded checkpoint, one adapter, or a
Twin-Merging base plus per-task adapters.

Every method sees, per module, each adapter's exact task vector ``τ_i = ΔW_i = B_i A_i`` against the
original base (``AdapterSet.deltas``), as factors ``(A [r, n], B [m, r])``, and returns the merged
``ΔW`` as factors again. Linear, task arithmetic, TSV and KnOTS never form an ``m × n`` matrix; the
element-wise methods (TIES, DARE) need the dense ``τ_i`` and build them one module at a time.
``λ`` (``--lambda``) scales the merged ΔW of every method. Formulas: mergekit's
``generalized_task_arithmetic`` for TIES/DARE (TIES normalises by ``Σ w_i M_i``, DARE rescales each
dropped ``τ_i`` to its L1 norm and does not normalise), the TSV-M and KnOTS papers for the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .adapter import AdapterConfig, AdapterSet
from .errors import SvdServeError
from .fold import copy_tokenizer_files
from .io import atomic_dir, check_out
from .linalg import LowRank, compress, exact_rank, factored_svd
from .methods.delta import Delta
from .model import add_low_rank_, fingerprint, linear_names, load_base

Factors = tuple[Tensor, Tensor]  # (A [r, n], B [m, r]) with ΔW = B @ A


@dataclass
class MergeParams:
    weights: list[float]
    density: float = 1.0
    lam: float = 1.0
    generator: torch.Generator | None = None  # DARE's Bernoulli masks


# --- helpers ------------------------------------------------------------------------------------
def concat(factors: list[Factors], coeffs: list[float]) -> Factors:
    """``Σ c_i B_i A_i`` as one pair of factors."""
    return (torch.cat([a for a, _ in factors]),
            torch.cat([b * c for (_, b), c in zip(factors, coeffs)], dim=1))


def dense(f: Factors) -> Tensor:
    return f[1].float() @ f[0].float()


def from_dense(d: Tensor) -> Factors:
    """A dense ``[m, n]`` ΔW as factors ``(I, D)`` or ``(D, I)``, whichever is smaller."""
    m, n = d.shape
    return (torch.eye(n), d) if n <= m else (d, torch.eye(m))


def factor_svd(a: Tensor, b: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U S Vh`` of ``b @ a`` (float64, exact rank) without forming the product."""
    u, s, vh = factored_svd(a, b)
    keep = exact_rank(s, rtol)
    return u[:, :keep], s[:keep], vh[:keep]


def trim(tau: Tensor, density: float) -> Tensor:
    """TIES: keep the ``⌊density · numel⌋`` (at least one) largest magnitudes of ``tau``."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    keep = torch.zeros(tau.numel(), dtype=tau.dtype)
    keep[torch.argsort(tau.abs().reshape(-1), descending=True)[:k]] = 1
    return tau * keep.view_as(tau)


def drop(tau: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescale to the L1 norm of ``tau``."""
    if density >= 1:
        return tau
    mask = torch.bernoulli(torch.full(tau.shape, density, dtype=torch.float32), generator=generator)
    kept = tau * mask
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def elect(taus: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """TIES sign election: ``Σ w_i τ_i M_i`` (``/ Σ w_i M_i`` if ``normalize``), where ``M_i`` keeps
    the entries whose sign agrees with ``sign(Σ w_i τ_i)`` (ties and zeros of the sum count as +)."""
    w = torch.tensor(weights, dtype=taus[0].dtype).view(-1, *[1] * taus[0].dim())
    weighted = torch.stack(taus) * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    mask = (weighted.sign() == majority).to(weighted.dtype)
    merged = (weighted * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


# --- methods: per module, [(A_i, B_i)] → merged (A, B) ----------------------------------------------
def linear(deltas: list[Factors], p: MergeParams) -> Factors:
    """``Σ w_i τ_i / Σ w_i`` (the weighted mean of the models)."""
    total = sum(p.weights)
    return concat(deltas, [p.lam * w / total for w in p.weights])


def task_arithmetic(deltas: list[Factors], p: MergeParams) -> Factors:
    """``λ Σ w_i τ_i``."""
    return concat(deltas, [p.lam * w for w in p.weights])


def ties(deltas: list[Factors], p: MergeParams) -> Factors:
    """Trim each τ_i to its top ``density`` magnitudes, elect signs, disjoint weighted mean."""
    taus = [trim(dense(d), p.density) for d in deltas]
    return from_dense(p.lam * elect(taus, p.weights, normalize=True))


def dare_linear(deltas: list[Factors], p: MergeParams) -> Factors:
    """Random drop (keep ``density``) with L1 rescale, then ``Σ w_i τ̃_i``."""
    taus = [drop(dense(d), p.density, p.generator) for d in deltas]
    return from_dense(p.lam * sum(w * t for w, t in zip(p.weights, taus)))


def dare_ties(deltas: list[Factors], p: MergeParams) -> Factors:
    """DARE's random drop, then TIES' sign election (summed, not normalised, as mergekit)."""
    taus = [drop(dense(d), p.density, p.generator) for d in deltas]
    return from_dense(p.lam * elect(taus, p.weights, normalize=False))


def tsv(deltas: list[Factors], p: MergeParams) -> Factors:
    """Task singular vectors (TSV-M): the top ``⌊k/T⌋`` singular triplets of each ``w_i τ_i``
    (k = min(m, n); only nonzero ones, since a low-rank τ has no defined vectors beyond its rank),
    concatenated; ``U_c`` and ``V_c`` replaced by their nearest orthonormal matrices ``P Qᵀ``;
    ``ΔW = λ Û diag(σ_c) V̂ᵀ``. All in factor space."""
    keep = max(1, min(deltas[0][1].shape[0], deltas[0][0].shape[1]) // len(deltas))
    us, ss, vhs = [], [], []
    for (a, b), w in zip(deltas, p.weights):
        u, s, vh = factor_svd(a, b * w)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    u_c, s_c, v_c = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs).T
    if not s_c.numel():
        return deltas[0][0][:1] * 0, deltas[0][1][:, :1] * 0
    u_hat, v_hat = nearest_orthonormal(u_c), nearest_orthonormal(v_c)
    return (p.lam * s_c[:, None] * v_hat.T).float(), u_hat.float()


def nearest_orthonormal(x: Tensor) -> Tensor:
    """``P Qᵀ`` from the thin SVD ``x = P Σ Qᵀ``."""
    pu, _, qh = torch.linalg.svd(x, full_matrices=False)
    return pu @ qh


def knots(deltas: list[Factors], p: MergeParams) -> Factors:
    """KnOTS-TIES: SVD of the concatenation ``[τ_1 … τ_T] = U S [V_1ᵀ … V_Tᵀ]`` (in factor space:
    ``[B_1 … B_T] · blockdiag(A_1 … A_T)``), TIES (``--density``, weights) over the per-task
    coefficients ``S V_tᵀ`` in the shared basis U, ``ΔW = λ U · merged``."""
    n = deltas[0][0].shape[1]
    u, s, vh = factor_svd(torch.block_diag(*[a for a, _ in deltas]), torch.cat([b for _, b in deltas], 1))
    if not s.numel():
        return deltas[0][0][:1] * 0, deltas[0][1][:, :1] * 0
    coeffs = [(s[:, None] * vh[:, t * n:(t + 1) * n]).float() for t in range(len(deltas))]
    merged = elect([trim(c, p.density) for c in coeffs], p.weights, normalize=True)
    return p.lam * merged, u.float()


MERGES: dict[str, Callable[[list[Factors], MergeParams], Factors]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "tsv": tsv,
    "knots": knots,
}
METHODS = [*MERGES, "twin"]


# --- native output ---------------------------------------------------------------------------------
def delta_adapter(model: nn.Module, factors: dict[str, Factors], base_model: str = "",
                  target_spec: str = "") -> AdapterSet:
    """A native ``delta`` adapter holding ``ΔW = B A`` per module (zero-padded to one rank),
    fingerprinted against ``model``'s current weights."""
    names = list(factors)
    rank = max(1, max(a.shape[0] for a, _ in factors.values()))
    config = AdapterConfig(
        method="delta", options=dataclasses.asdict(Delta.Options(rank=rank)),
        targets={n: list(model.get_submodule(n).weight.shape) for n in names},
        target_spec=target_spec or ",".join(sorted({n.rsplit(".", 1)[-1] for n in names})),
        architecture=type(model).__name__, base_fingerprint=fingerprint(model, names),
        base_model=str(base_model))
    adapters = AdapterSet(config)
    with torch.no_grad():
        for name, layer in adapters.items():
            a, b = factors[name]
            layer.A.zero_()
            layer.B.zero_()
            layer.A[: a.shape[0]].copy_(a)
            layer.B[:, : b.shape[1]].copy_(b)
    return adapters


# --- the command -----------------------------------------------------------------------------------
def check_args(method: str, adapter_dirs: list, weights: list[float] | None, density: float,
               fold: bool, rank: int | None, shared: str) -> list[float]:
    if method not in METHODS:
        raise SvdServeError(f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}")
    if not adapter_dirs:
        raise SvdServeError("give at least one --adapter")
    if weights is None:
        weights = [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise SvdServeError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters")
    if method == "linear" and abs(sum(weights)) < 1e-8:
        raise SvdServeError("linear merge: the weights sum to zero")
    if not 0 < density <= 1:
        raise SvdServeError(f"--density {density} must be in (0, 1]")
    if method == "twin":
        if fold or rank is None:
            raise SvdServeError("twin writes a new base plus one adapter per task: give --rank, not --fold")
        if shared not in MERGES:
            raise SvdServeError(f"--shared must be one of: {', '.join(MERGES)}")
        names = [Path(p).name for p in adapter_dirs]
        if len(set(names)) != len(names):
            raise SvdServeError(f"twin: adapter directory names must be distinct (they name the outputs): {names}")
    elif fold == (rank is not None):
        raise SvdServeError("give exactly one of --fold (a merged checkpoint) and --rank K (one adapter)")
    if rank is not None and rank < 1:
        raise SvdServeError("--rank must be at least 1")
    return weights


def merge(base: str | Path, adapter_dirs: list[str | Path], out: str | Path, method: str,
          weights: list[float] | None = None, density: float = 1.0, lam: float = 1.0, seed: int = 0,
          fold: bool = False, rank: int | None = None, shared: str = "ties", overwrite: bool = False) -> dict:
    """Merge native adapters of one base; returns a report (output kind, ranks, errors)."""
    weights = check_args(method, adapter_dirs, weights, density, fold, rank, shared)
    inputs = [base, *adapter_dirs]
    check_out(out, inputs, overwrite)
    model = load_base(base, dtype="auto")
    sets = []
    for path in adapter_dirs:
        try:
            sets.append(AdapterSet.load(path, model))
        except SvdServeError as e:
            raise SvdServeError(f"{path}: {e}") from None
    all_deltas = [s.deltas() for s in sets]
    covered = set().union(*all_deltas)
    modules = [n for n in linear_names(model) if n in covered]
    params = MergeParams(weights=weights, density=density, lam=lam,
                         generator=torch.Generator().manual_seed(seed))
    merge_fn = MERGES[shared if method == "twin" else method]

    merged: dict[str, Factors] = {}
    for name in modules:
        m, n = model.get_submodule(name).weight.shape
        zero = (torch.zeros(1, n), torch.zeros(m, 1))
        deltas = [(d[name].A, d[name].B) if name in d else zero for d in all_deltas]
        merged[name] = merge_fn(deltas, params)

    report: dict = {"method": method, "modules": len(modules), "out": str(out)}
    if fold:
        for name, f in merged.items():
            add_low_rank_(model.get_submodule(name).weight, *f)
        with atomic_dir(out, inputs, overwrite) as tmp:
            model.save_pretrained(tmp)
            copy_tokenizer_files(Path(base), tmp)
        report["kind"] = "checkpoint"
        return report
    if method != "twin":
        lows = {name: compress(*f, max_rank=rank) for name, f in merged.items()}
        delta_adapter(model, {n: (lr.A, lr.B) for n, lr in lows.items()}, str(base)).save(out, inputs, overwrite)
        report.update(kind="adapter", **_rank_report(lows))
        return report

    # twin: the shared merge becomes the new base; each task keeps its residual τ_t − ΔW* at --rank
    residuals: list[dict[str, LowRank]] = [{} for _ in sets]
    for name, (sa, sb) in merged.items():
        m, n = model.get_submodule(name).weight.shape
        for t, d in enumerate(all_deltas):
            a, b = (d[name].A, d[name].B) if name in d else (torch.zeros(1, n), torch.zeros(m, 1))
            residuals[t][name] = compress(torch.cat([a, sa]), torch.cat([b, -sb], 1), max_rank=rank)
        add_low_rank_(model.get_submodule(name).weight, sa, sb)
    with atomic_dir(out, inputs, overwrite) as tmp:
        model.save_pretrained(tmp / "base")
        copy_tokenizer_files(Path(base), tmp / "base")
        report["kind"] = "twin"
        report["adapters"] = {}
        for path, res in zip(adapter_dirs, residuals):
            name = Path(path).name
            delta_adapter(model, {n: (lr.A, lr.B) for n, lr in res.items()},
                          str(Path(out) / "base")).save(tmp / "adapters" / name)
            report["adapters"][name] = _rank_report(res)
    return report


def _rank_report(lows: dict[str, LowRank]) -> dict:
    return {"rank": max(lr.rank for lr in lows.values()),
            "max_rel_error": max(lr.rel_error for lr in lows.values())}
