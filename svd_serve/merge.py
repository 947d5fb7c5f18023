"""``svd-serve merge``: several adapters of one base → one folded checkpoint, one adapter, or a
Twin-Merging base plus per-task adapters.

Every method sees, per module, each adapter's exact task vector ``τ_i = ΔW_i = B_i A_i`` against the
original base (``AdapterSet.deltas``), as factors ``(A [r, n], B [m, r])``, and returns the merged
``ΔW``: as factors (linear, task arithmetic, TSV and KnOTS, which never form an ``m × n`` matrix), or
as that module's dense ``m × n`` matrix (the element-wise methods, TIES and DARE, which need the
dense ``τ_i``). Modules are merged one at a time, in model order, just before they are written.
``λ`` (``--lambda``) scales the merged ΔW of every method. Formulas: mergekit's
``generalized_task_arithmetic`` for TIES/DARE (TIES normalises by ``Σ w_i M_i``, DARE rescales each
dropped ``τ_i`` to its L1 norm and does not normalise), the TSV-M and KnOTS papers for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .adapter import AdapterSet, delta_adapter
from .weights import Weights, parse_size, return_freed_memory, write_folded
from .errors import SvdServeError
from .io import atomic_dir, check_out
from .linalg import LowRank, compress, exact_rank, factored_svd
from .model import linear_names

Merged = LowRank | Tensor  # a merged ΔW: factors, or the dense [m, n] matrix of an element-wise merge


@dataclass
class MergeParams:
    weights: list[float]
    density: float = 1.0
    lam: float = 1.0
    generator: torch.Generator | None = None  # DARE's Bernoulli masks


# --- helpers ------------------------------------------------------------------------------------
def concat(factors: list[LowRank], coeffs: list[float]) -> LowRank:
    """``Σ c_i B_i A_i`` as one pair of factors."""
    return LowRank.cat([LowRank(a, b * c) for (a, b), c in zip(factors, coeffs)])


def as_factors(delta: Merged) -> LowRank:
    """A merged ΔW as factors: a dense ``[m, n]`` one as ``(I, D)`` or ``(D, I)``, whichever is smaller."""
    if isinstance(delta, LowRank):
        return delta
    m, n = delta.shape
    return LowRank(torch.eye(n), delta) if n <= m else LowRank(delta, torch.eye(m))


def trim(tau: Tensor, density: float) -> Tensor:
    """TIES: keep the ``⌊density · numel⌋`` (at least one) largest magnitudes of ``tau``, zero the
    rest. Found by selection (``kthvalue``), not by sorting: mergekit's ``argsort`` keeps the same
    entries wherever magnitudes are distinct (among equal magnitudes at the threshold, either picks
    some; this one the first), in a fraction of the time and memory."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    mag = tau.abs().reshape(-1)
    threshold = mag.kthvalue(mag.numel() - k + 1).values  # the k-th largest
    keep = mag > threshold
    keep[(mag == threshold).nonzero().squeeze(1)[: k - int(keep.sum())]] = True
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
def linear(deltas: list[LowRank], p: MergeParams) -> LowRank:
    """``Σ w_i τ_i / Σ w_i`` (the weighted mean of the models)."""
    total = sum(p.weights)
    return concat(deltas, [p.lam * w / total for w in p.weights])


def task_arithmetic(deltas: list[LowRank], p: MergeParams) -> LowRank:
    """``λ Σ w_i τ_i``."""
    return concat(deltas, [p.lam * w for w in p.weights])


def ties(deltas: list[LowRank], p: MergeParams) -> Tensor:
    """Trim each τ_i to its top ``density`` magnitudes, elect signs, disjoint weighted mean."""
    taus = [trim(d.dense(), p.density) for d in deltas]
    return p.lam * elect(taus, p.weights, normalize=True)


def dare_linear(deltas: list[LowRank], p: MergeParams) -> Tensor:
    """Random drop (keep ``density``) with L1 rescale, then ``Σ w_i τ̃_i``."""
    taus = [drop(d.dense(), p.density, p.generator) for d in deltas]
    return p.lam * sum(w * t for w, t in zip(p.weights, taus))


def dare_ties(deltas: list[LowRank], p: MergeParams) -> Tensor:
    """DARE's random drop, then TIES' sign election (summed, not normalised, as mergekit)."""
    taus = [drop(d.dense(), p.density, p.generator) for d in deltas]
    return p.lam * elect(taus, p.weights, normalize=False)


def tsv(deltas: list[LowRank], p: MergeParams) -> LowRank:
    """Task singular vectors (TSV-M): the top ``⌊k/T⌋`` singular triplets of each ``w_i τ_i``
    (k = min(m, n); only nonzero ones, since a low-rank τ has no defined vectors beyond its rank),
    concatenated; ``U_c`` and ``V_c`` replaced by their nearest orthonormal matrices ``P Qᵀ``;
    ``ΔW = λ Û diag(σ_c) V̂ᵀ``. All in factor space."""
    keep = max(1, min(deltas[0][1].shape[0], deltas[0][0].shape[1]) // len(deltas))
    us, ss, vhs = [], [], []
    for (a, b), w in zip(deltas, p.weights):
        u, s, vh = factored_svd(a, b * w)
        k = min(keep, exact_rank(s))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_c, s_c, v_c = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs).T
    if not s_c.numel():
        return LowRank(deltas[0][0][:1] * 0, deltas[0][1][:, :1] * 0)
    u_hat, v_hat = nearest_orthonormal(u_c), nearest_orthonormal(v_c)
    return LowRank((p.lam * s_c[:, None] * v_hat.T).float(), u_hat.float())


def nearest_orthonormal(x: Tensor) -> Tensor:
    """``P Qᵀ`` from the thin SVD ``x = P Σ Qᵀ``."""
    pu, _, qh = torch.linalg.svd(x, full_matrices=False)
    return pu @ qh


def knots(deltas: list[LowRank], p: MergeParams) -> LowRank:
    """KnOTS-TIES: SVD of the concatenation ``[τ_1 … τ_T] = U S [V_1ᵀ … V_Tᵀ]`` (in factor space:
    ``[B_1 … B_T] · blockdiag(A_1 … A_T)``), TIES (``--density``, weights) over the per-task
    coefficients ``S V_tᵀ`` in the shared basis U, ``ΔW = λ U · merged``."""
    n = deltas[0][0].shape[1]
    u, s, vh = factored_svd(torch.block_diag(*[a for a, _ in deltas]), torch.cat([b for _, b in deltas], 1))
    k = exact_rank(s)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if not s.numel():
        return LowRank(deltas[0][0][:1] * 0, deltas[0][1][:, :1] * 0)
    coeffs = [(s[:, None] * vh[:, t * n:(t + 1) * n]).float() for t in range(len(deltas))]
    merged = elect([trim(c, p.density) for c in coeffs], p.weights, normalize=True)
    return LowRank(p.lam * merged, u.float())


MERGES: dict[str, Callable[[list[LowRank], MergeParams], Merged]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "tsv": tsv,
    "knots": knots,
}
METHODS = [*MERGES, "twin"]


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
          fold: bool = False, rank: int | None = None, shared: str = "ties",
          max_shard_size: int | str | None = None, overwrite: bool = False) -> dict:
    """Merge native adapters of one base; returns a report (output kind, ranks, errors).

    The base is read one weight at a time (only the fingerprint's samples unless a checkpoint is
    written), and each module is merged just before it is needed, so memory holds the adapters and
    one module's merge at a time."""
    weights = check_args(method, adapter_dirs, weights, density, fold, rank, shared)
    max_shard_size = parse_size(max_shard_size)
    inputs = [base, *adapter_dirs]
    check_out(out, inputs, overwrite)
    return_freed_memory()
    ckpt = Weights(base)
    sets = []
    for path in adapter_dirs:
        try:
            sets.append(AdapterSet.load(path, ckpt))
        except SvdServeError as e:
            raise SvdServeError(f"{path}: {e}") from None
    all_deltas = [s.deltas() for s in sets]
    covered = set().union(*all_deltas)
    modules = [n for n in linear_names(ckpt.skeleton) if n in covered]
    params = MergeParams(weights=weights, density=density, lam=lam,
                         generator=torch.Generator().manual_seed(seed))
    merge_fn = MERGES[shared if method == "twin" else method]

    def task_vectors(name: str) -> list[LowRank]:
        """Each adapter's ΔW of ``name`` (one zero component where an adapter lacks it)."""
        m, n = ckpt.get_submodule(name).weight.shape
        zero = LowRank(torch.zeros(1, n), torch.zeros(m, 1))
        return [d[name].factors if name in d else zero for d in all_deltas]

    # modules are merged in model order, one at a time (DARE's masks are drawn in that order)
    def merged(name: str) -> Merged:
        return merge_fn(task_vectors(name), params)

    report: dict = {"method": method, "modules": len(modules), "out": str(out)}
    if fold:
        with atomic_dir(out, inputs, overwrite) as tmp:
            write_folded(ckpt, tmp, modules, merged, max_shard_size)
        report["kind"] = "checkpoint"
        return report
    if method != "twin":
        lows = {name: compress(*as_factors(merged(name)), max_rank=rank) for name in modules}
        delta_adapter({n: lr.factors for n, lr in lows.items()}, ckpt.architecture,
                      ckpt.fingerprint(modules), str(base)).save(out, inputs, overwrite)
        report.update(kind="adapter", **_rank_report(lows))
        return report

    # twin: the shared merge becomes the new base; each task keeps its residual τ_t − ΔW* at --rank
    residuals: list[dict] = [{} for _ in sets]

    def shared_merge(name: str) -> Merged:
        shared_delta = merged(name)
        sa, sb = as_factors(shared_delta)
        for t, (a, b) in enumerate(task_vectors(name)):
            residuals[t][name] = compress(torch.cat([a, sa]), torch.cat([b, -sb], 1), max_rank=rank)
        return shared_delta

    with atomic_dir(out, inputs, overwrite) as tmp:
        (tmp / "base").mkdir()
        write_folded(ckpt, tmp / "base", modules, shared_merge, max_shard_size)
        new_base = Weights(tmp / "base").fingerprint(modules)
        report["kind"] = "twin"
        report["adapters"] = {}
        for path, res in zip(adapter_dirs, residuals):
            name = Path(path).name
            delta_adapter({n: lr.factors for n, lr in res.items()}, ckpt.architecture, new_base,
                          str(Path(out) / "base")).save(tmp / "adapters" / name)
            report["adapters"][name] = _rank_report(res)
    return report


def _rank_report(lows: dict) -> dict:
    return {"rank": max(lr.rank for lr in lows.values()),
            "max_rel_error": max(lr.rel_error for lr in lows.values())}
