"""``svd-serve merge``: several adapters of one base → one folded checkpoint, one adapter, or a
Twin-Merging base plus per-task adapters.

A merge method is one entry of :data:`MERGES`, a :class:`Merge`: ``check`` (its own argument rules),
``plan`` (every module's merged ΔW) and ``write`` (the output; by default ``--fold`` or ``--max-rank``).
Most are a :class:`Rule`: a per-module function that sees each adapter's exact task vector
``τ_i = ΔW_i = B_i A_i`` against the original base (``AdapterSet.deltas``), as factors
``(A [r, n], B [m, r])``, and returns the merged ``ΔW``: as factors (linear, task arithmetic, TSV and
KnOTS, which never form an ``m × n`` matrix), or as that module's dense ``m × n`` matrix (the
element-wise rules, TIES and DARE, which need the dense ``τ_i``). Modules are merged one at a time, in
model order, just before they are written. ``λ`` (``--lambda``) scales the merged ΔW of every rule.
Two entries are not rules: ``atlas`` learns per-module coefficients on a few labelled rows with the
training loop (atlas.py) before writing, and ``twin`` writes the rule ``--shared`` into a new base
plus one residual adapter per task. Formulas: mergekit's ``generalized_task_arithmetic`` for
TIES/DARE (TIES normalises by ``Σ w_i M_i``, DARE rescales each dropped ``τ_i`` to its L1 norm and
does not normalise), the TSV-M and KnOTS papers for the others.

Adding a merge: a per-module function ``(deltas, params) → ΔW`` listed in :data:`MERGES` as a
``Rule``, or a :class:`Merge` subclass with its own ``check``/``plan``/``write``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .adapter import AdapterSet, delta_adapter
from .atlas import AtlasSettings, learn
from .calib import TruncationWeights, check_weighting, lower_rank, module_errors, truncation_weights
from .weights import Weights, folded_dtype, parse_size, return_freed_memory, write_folded
from .errors import SvdServeError
from .files import atomic_dir, check_out
from .hub import resolve
from .linalg import Compressed, LowRank, exact_rank, factored_svd
from .model import linear_names
from .schema import Settings, opt

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
    return delta if isinstance(delta, LowRank) else LowRank.of_dense(delta)


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


# --- rules: per module, [(A_i, B_i)] → merged (A, B) ------------------------------------------------
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


# --- the contract ------------------------------------------------------------------------------------
@dataclass
class MergeJob:
    """One merge being run: what was asked, the base (read one weight at a time), every adapter's task
    vectors and the modules any of them covers, in model order."""

    base: str | Path
    out: Path
    adapter_dirs: list[str | Path]
    inputs: list  # what --out must not overwrite
    ckpt: Weights
    deltas: list[dict]  # per adapter: module → its exact ΔW against the original base
    modules: list[str]
    params: MergeParams
    fold: bool
    rank: int | None  # --max-rank
    stats: TruncationWeights | None  # how --max-rank truncates (--weighting over --calib-data)
    shared: str  # twin: the rule of the shared merge
    atlas: AtlasSettings | None
    seed: int
    max_shard_size: int | None
    overwrite: bool
    dtype: torch.dtype | None = None  # a quantized base's fold: the dtype of its dequantized weights

    def task_vectors(self, name: str) -> list[LowRank]:
        """Each adapter's ΔW of ``name`` (one zero component where an adapter lacks it)."""
        m, n = self.ckpt.get_submodule(name).weight.shape
        zero = LowRank(torch.zeros(1, n), torch.zeros(m, 1))
        return [d[name].factors if name in d else zero for d in self.deltas]

    def lower(self, name: str, delta: Merged) -> Compressed:
        """``delta`` of module ``name`` at ``--max-rank`` (in the ``--weighting``)."""
        return lower_rank(self.stats, name, as_factors(delta), self.rank)

    def fingerprint(self) -> str:
        return self.ckpt.fingerprint(self.modules)


@dataclass
class Plan:
    """What a merge computes before writing: ``delta(name)``, the merged ΔW of a module, asked for once
    per module in model order (computed then, one module at a time, unless learned beforehand), and
    the entries it adds to the report."""

    delta: Callable[[str], Merged]
    report: dict = field(default_factory=dict)


class Merge:
    """What every merge method is (an entry of :data:`MERGES`): ``check`` refuses arguments it cannot
    use before any work, ``plan`` gives every module's merged ΔW, ``write`` writes the output. By
    default the output is a checkpoint with ΔW folded in (``--fold``) or one ``delta`` adapter of rank
    ≤ ``--max-rank``."""

    name: ClassVar[str]
    learns: ClassVar[bool] = False  # learns on labelled rows (--data: AtlasSettings)

    def check(self, args: MergeArgs) -> None:
        """Its own rules for the arguments (after the ones every merge shares, :meth:`MergeArgs.check`)."""
        if args.fold == (args.rank is not None):
            raise SvdServeError("give exactly one of --fold (a merged checkpoint) and --max-rank K (one adapter)")

    def plan(self, job: MergeJob) -> Plan:
        raise NotImplementedError

    def write(self, job: MergeJob, plan: Plan) -> dict:
        """The output, and the report's entries about it (its kind; an adapter's ranks and errors)."""
        if job.fold:
            with atomic_dir(job.out, job.inputs, job.overwrite) as tmp:
                write_folded(job.ckpt, tmp, job.modules, plan.delta, job.max_shard_size, dtype=job.dtype)
            return {"kind": "checkpoint"}
        lows = {name: job.lower(name, plan.delta(name)) for name in job.modules}
        delta_adapter(factors_of(lows), job.ckpt.architecture, job.fingerprint(),
                      str(job.base)).save(job.out, job.inputs, job.overwrite)
        return {"kind": "adapter", **rank_report(lows, job.stats)}


class Rule(Merge):
    """A merge by a per-module rule ``(task vectors, params) → merged ΔW`` (the functions above);
    called like the rule itself. Modules are merged in model order, one at a time (DARE's masks are
    drawn in that order)."""

    def __init__(self, rule: Callable[[list[LowRank], MergeParams], Merged]):
        self.name, self.rule = rule.__name__, rule

    def __call__(self, deltas: list[LowRank], p: MergeParams) -> Merged:
        return self.rule(deltas, p)

    def plan(self, job: MergeJob) -> Plan:
        return Plan(partial(self.merge_module, job))

    def merge_module(self, job: MergeJob, name: str) -> Merged:
        return self(job.task_vectors(name), job.params)


class LearnedCoefficients(Merge):
    """aTLAS (atlas.py): one coefficient per task vector and module (or per singular component),
    learned on ``--data`` with the training loop before anything is written."""

    name = "atlas"
    learns = True

    def plan(self, job: MergeJob) -> Plan:
        learned = learn(job.base, {name: job.task_vectors(name) for name in job.modules},
                        [job.params.lam * w for w in job.params.weights], job.atlas, job.ckpt.architecture,
                        job.fingerprint(), job.seed)
        return Plan(learned.factors.__getitem__, {"atlas": learned.summary()})


class Twin(Merge):
    """Twin-Merging: the shared merge (``--shared``, a rule) folded into a new base, OUT/base, and each
    task's residual ``τ_t − ΔW*`` kept as an adapter of rank ≤ ``--max-rank`` on it,
    OUT/adapters/NAME."""

    name = "twin"

    def check(self, args: MergeArgs) -> None:
        if args.fold or args.rank is None:
            raise SvdServeError("twin writes a new base plus one adapter per task: give --max-rank, not --fold")
        if args.shared not in RULES:
            raise SvdServeError(f"--shared must be one of: {', '.join(RULES)}")
        names = [Path(p).name for p in args.adapter_dirs]
        if len(set(names)) != len(names):
            raise SvdServeError(f"twin: adapter directory names must be distinct (they name the outputs): {names}")

    def plan(self, job: MergeJob) -> Plan:
        return MERGES[job.shared].plan(job)

    def write(self, job: MergeJob, plan: Plan) -> dict:
        split = TwinSplit(job, plan)
        with atomic_dir(job.out, job.inputs, job.overwrite) as tmp:
            (tmp / "base").mkdir()
            write_folded(job.ckpt, tmp / "base", job.modules, split.shared, job.max_shard_size, dtype=job.dtype)
            new_base = Weights(tmp / "base").fingerprint(job.modules)
            adapters = {}
            for path, residual in zip(job.adapter_dirs, split.residuals):
                name = Path(path).name
                delta_adapter(factors_of(residual), job.ckpt.architecture, new_base,
                              str(job.out / "base")).save(tmp / "adapters" / name)
                adapters[name] = rank_report(residual, job.stats)
        return {"kind": "twin", "adapters": adapters}


class TwinSplit:
    """Twin-Merging's split of every module, computed once, as the new base is written (in model
    order): :meth:`shared` gives the shared ΔW* folded into the base and keeps each task's residual
    ``τ_t − ΔW*`` at ``--max-rank`` in :attr:`residuals` (per task: module → residual)."""

    def __init__(self, job: MergeJob, plan: Plan):
        self.job, self.plan = job, plan
        self.residuals: list[dict[str, Compressed]] = [{} for _ in job.deltas]

    def shared(self, name: str) -> Merged:
        delta = self.plan.delta(name)
        sa, sb = as_factors(delta)
        for residual, (a, b) in zip(self.residuals, self.job.task_vectors(name)):
            residual[name] = self.job.lower(name, LowRank(torch.cat([a, sa]), torch.cat([b, -sb], 1)))
        return delta


# the registry: a merge method is one entry (its name is the entry's name)
MERGES: dict[str, Merge] = {m.name: m for m in (
    *map(Rule, (linear, task_arithmetic, ties, dare_linear, dare_ties, tsv, knots)),
    LearnedCoefficients(), Twin())}
RULES = [name for name, m in MERGES.items() if isinstance(m, Rule)]  # what --shared takes


# --- the command -----------------------------------------------------------------------------------
@dataclass
class MergeArgs(Settings):
    """What ``merge`` was asked. Each value is declared with the one schema (:mod:`svd_serve.schema`:
    its type, bounds, messages and help text); :meth:`check` checks them, and the rules that relate
    several (weights per adapter, the method's own), before any work."""

    method: str = opt(doc="Merge method.")
    adapter_dirs: list = opt(doc="svd-serve adapter directory (repeat for each).", flag="--adapter")
    weights: list[float] | None = opt(doc="Comma list, one per adapter (default: all 1).")
    density: float = opt(1.0, "TIES/KnOTS: fraction of magnitudes kept; DARE: keep probability.", gt=0, le=1)
    fold: bool = opt(False, "Write a merged HF checkpoint.")
    rank: int | None = opt(None, "Write one adapter of rank <= K (twin: each task adapter).", ge=1,
                           flag="--max-rank")
    shared: str = opt("ties", "twin: the method of the shared merge.")
    lam: float = opt(1.0, "Scale of the merged ΔW (atlas: the coefficients start at lambda × weight).",
                     flag="--lambda")
    seed: int = opt(0, "DARE's random masks; atlas: the data order.", ge=0, lt=2**63)
    atlas: AtlasSettings | None = None

    @classmethod
    def subject(cls, name: str) -> str:
        return cls.fields()[name].metadata.get("flag") or cls.flag(name)

    @classmethod
    def violation(cls, f: dataclasses.Field, kind: type, value: float) -> str | None:
        """As every command's, but a value that is not finite is said first, and an integer between
        two bounds is refused by its range (``--seed must be in [0, 2**63)``)."""
        if not math.isfinite(value):
            return f"must be a finite number, not {value}"
        has = [any(f.metadata.get(k) is not None for k in keys) for keys in (("ge", "gt"), ("le", "lt"))]
        return super().violation(f, float if all(has) else kind, value)

    def check(self) -> None:
        """Refuse bad arguments with one clear error: the ones every merge shares, then the method's
        own; the weights become all 1 unless given."""
        if self.method not in MERGES:
            raise SvdServeError(f"unknown merge method {self.method!r}; choose one of: {', '.join(MERGES)}")
        how = MERGES[self.method]
        if how.learns != (self.atlas is not None):
            raise SvdServeError("atlas learns its coefficients on labelled rows: give --data FILE.jsonl" if how.learns
                                else "--data, --steps, --lr and --per-component are options of --method atlas only")
        if not self.adapter_dirs:
            raise SvdServeError("give at least one --adapter")
        self.weights = self.checked_weights()
        for name in ("lam", "density", "seed", "fold", "shared"):
            setattr(self, name, self.checked(name, getattr(self, name)))
        if self.method == "linear" and abs(sum(self.weights)) < 1e-8:
            raise SvdServeError("linear merge: the weights sum to zero")
        how.check(self)
        self.rank = self.checked("rank", self.rank)

    def checked_weights(self) -> list[float]:
        weights = self.weights if self.weights is not None else [1.0] * len(self.adapter_dirs)
        if len(weights) != len(self.adapter_dirs):
            raise SvdServeError(f"--weights has {len(weights)} values for {len(self.adapter_dirs)} adapters")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in weights):
            raise SvdServeError(f"--weights must be finite numbers, not {', '.join(map(str, weights))}")
        return [float(v) for v in weights]


def merge(base: str | Path, adapter_dirs: list[str | Path], out: str | Path, method: str,
          weights: list[float] | None = None, density: float = 1.0, lam: float = 1.0, seed: int = 0,
          fold: bool = False, rank: int | None = None, shared: str = "ties",
          max_shard_size: int | str | None = None, overwrite: bool = False,
          atlas: AtlasSettings | None = None, weighting: str = "none", calib_data: str | Path | None = None,
          dtype: str | None = None, revision: str | None = None) -> dict:
    """Merge native adapters of one base with the merge method ``method`` (a key of :data:`MERGES`);
    returns a report (output kind, ranks, errors). ``atlas``: how ``method="atlas"`` learns its
    coefficients (``seed`` orders its data). ``weighting`` and ``calib_data`` choose how ``rank``
    truncates the merged ΔW and the twin residuals (:func:`svd_serve.calib.truncation_weights`: the
    statistics of the base on the calibration rows, as the merged model does not exist before the
    merge; loads the model) and add each module's output error on those rows to the report.
    ``dtype``: a quantized base's ``--fold`` (or twin's new base) writes its dequantized weights in it
    (required there). ``base``: a local directory or a Hugging Face Hub id at ``revision``
    (:mod:`svd_serve.hub`).

    The base is read one weight at a time (only the fingerprint's samples unless a checkpoint is
    written, or atlas trains on it), and each module is merged just before it is needed, so memory
    holds the adapters and one module's merge at a time."""
    args = MergeArgs(method, adapter_dirs, weights, density, fold, rank, shared, lam, seed, atlas)
    args.check()
    check_weighting(weighting, calib_data, rank is not None)
    base = resolve(base, revision).path
    inputs = [base, *adapter_dirs, *([atlas.data] if atlas else [])]
    check_out(out, inputs, overwrite)
    if atlas is not None:
        atlas.check(base, seed)
    job = open_job(base, out, inputs, args, parse_size(max_shard_size), overwrite,
                   weighting, calib_data)
    if args.fold or method == "twin":
        job.dtype = folded_dtype(job.ckpt, dtype)
    elif dtype is not None:
        raise SvdServeError("--dtype applies to a written checkpoint (--fold, or twin's new base)")
    how = MERGES[method]
    plan = how.plan(job)
    return {"method": method, "modules": len(job.modules), "out": str(out), **plan.report, **how.write(job, plan)}


def open_job(base: str | Path, out: str | Path, inputs: list, args: MergeArgs, max_shard_size: int | None,
             overwrite: bool, weighting: str, calib_data: str | Path | None) -> MergeJob:
    """The base (one weight at a time), the adapters (bad ones refused before the base is loaded) and
    their task vectors, the modules they cover, and the statistics of a weighted ``--max-rank``."""
    return_freed_memory()
    ckpt = Weights(base)
    deltas = [load_adapter(path, ckpt).deltas() for path in args.adapter_dirs]
    covered = set().union(*deltas)
    modules = [n for n in linear_names(ckpt.skeleton) if n in covered]
    params = MergeParams(weights=args.weights, density=args.density, lam=args.lam,
                         generator=torch.Generator().manual_seed(args.seed))
    stats = truncation_weights(weighting, calib_data, base, modules) if args.rank is not None else None
    return MergeJob(base, Path(out), args.adapter_dirs, inputs, ckpt, deltas, modules, params, args.fold,
                    args.rank, stats, args.shared, args.atlas, args.seed, max_shard_size, overwrite)


def load_adapter(path: str | Path, ckpt: Weights) -> AdapterSet:
    try:
        return AdapterSet.load(path, ckpt)
    except SvdServeError as e:
        raise SvdServeError(f"{path}: {e}") from None


def factors_of(lows: dict[str, Compressed]) -> dict[str, LowRank]:
    return {name: low.factors for name, low in lows.items()}


def rank_report(lows: dict[str, Compressed], stats: TruncationWeights | None) -> dict:
    """An adapter's entries of the report: its rank, largest relative error, and (weighted) each module's errors."""
    return {"rank": max(lr.rank for lr in lows.values()), "max_rel_error": max(lr.rel_error for lr in lows.values()),
            **({"weighting": stats.kind, "errors": module_errors(lows)} if stats is not None else {})}
