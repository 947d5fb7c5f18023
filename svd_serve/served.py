"""Adapters written against the base a server actually runs: a quantized copy of the original.

An exported adapter is exact against the original weights ``W``. A server that runs a quantized
copy (W4A16, W8A8, FP8, ...) computes ``deq(Q(W)) + ΔW = W + ΔW − E`` with ``E = W − deq(Q(W))``:
the adapted model plus the quantization error of every module. Written against the served base,
the best LoRA ``B'A'`` of rank ``≤ K`` minimises, per module, the output error on calibration inputs
``X`` (rows ``x`` of the full-precision adapted model, the model the server should reproduce)::

    ‖((W + ΔW) − (deq(Q(W)) + B'A')) X‖_F = ‖(M − B'A') X‖_F,   M = ΔW + E

whose minimiser is the best rank-K approximation of ``M`` in the metric of the input second moment
``C = XᵀX / N``: ``B'A' = trunc_K(M C^{1/2}) C^{-1/2}`` (Eckart–Young after weighing the inputs, as
``--weighting activation`` truncates, :class:`svd_serve.linalg.Weighting`; :class:`ModuleFit`). ``C`` is damped as every activation-weighted
truncation is (:data:`svd_serve.linalg.DAMP` of its mean eigenvalue): directions the calibration rows
leave unexcited fall back to the Frobenius fit, which keeps the correction from chasing noise there.

``E`` is full rank, so no ``K`` is exact: the default ``K`` is the exact rank of ``ΔW`` plus the
adapter's rank ``r`` (``r`` components of the quantization error on top of the adapter), and
``K ≥ rank(M)`` reproduces the adapted model exactly on any input.

The served base is checked before anything is computed (:func:`check_served`): same architecture,
same shapes of every target module, and every target weight within :data:`MAX_DISTANCE` of the
original (relative Frobenius distance): a quantization of *this* base, not another model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import SvdServeError
from .linalg import DAMP, Compressed, LowRank, compress, damped, exact_rank, factored_svd
from .weights import Weights, fingerprint_digest, fingerprint_stride

# The largest accepted ‖deq(Q(W)) − W‖_F / ‖W‖_F of a target module. Round-to-nearest int4 with groups
# of 128 leaves about 0.1 on real weights (int8: about 0.005, FP8: about 0.03); a different model of the
# same shapes is at about √2 ≈ 1.4 (independent weights of equal norm), and one fine-tuned for a while
# at 0.3 and more. 0.5 passes any quantization that keeps 3 bits or more and refuses another model.
MAX_DISTANCE = 0.5
NORMALIZATION = "‖(W + ΔW) X‖_F: the adapted module's output on the calibration rows"
CALIB_NEEDED = ("--served-base needs --calib-data FILE: the factors written against the served base "
                "minimise each module's output error on the inputs of those rows")


def open_served(path: str | Path) -> Weights:
    """The served checkpoint, read through :class:`svd_serve.weights.Weights` (a quantized one yields
    dequantized weights); a format it cannot read is one clear error."""
    try:
        return Weights(path)
    except SvdServeError as e:
        raise SvdServeError(f"--served-base {path}: {e}") from None


def quantization(served: Weights) -> dict | None:
    """The served checkpoint's quantization as the report records it (method, layout, bits, group and a
    one-line description), or None for a float checkpoint."""
    q = getattr(served, "quantization", None)
    if q is None:
        return None
    return {"method": q.method, "format": q.format, "bits": q.bits, "group": q.group, "describe": q.describe()}


@dataclass
class ServedModule:
    """One module's weights on both bases, float64: ``W`` and ``E = W − deq(Q(W))``."""

    weight: Tensor
    error: Tensor

    @property
    def distance(self) -> float:
        """``‖E‖_F / ‖W‖_F``."""
        ref = float(self.weight.norm())
        return float(self.error.norm()) / ref if ref > 0 else float(self.error.norm())


def served_module(full: Weights, served: Weights, name: str) -> ServedModule:
    """``W`` and ``E`` of module ``name``, refused when the shapes differ."""
    w = full.weight(name).double()
    try:
        wq = served.weight(name)
    except SvdServeError as e:
        raise SvdServeError(f"--served-base {served.path}: {e}") from None
    if tuple(wq.shape) != tuple(w.shape):
        raise SvdServeError(f"--served-base {served.path}: {name} has shape {list(wq.shape)}, the adapter's "
                            f"base has {list(w.shape)}: it is not a copy of this base")
    return ServedModule(w, w - wq.double())


def check_architecture(full: Weights, served: Weights) -> None:
    if served.architecture != full.architecture:
        raise SvdServeError(f"--served-base {served.path} is a {served.architecture}, the adapter's base "
                            f"{full.path} a {full.architecture}")


def check_served(full: Weights, served: Weights, names: list[str], max_distance: float = MAX_DISTANCE) -> dict[str, float]:
    """Refuse a served base that is not a (quantized) copy of ``full``: another architecture, another
    shape of a target module, or a target weight farther than ``max_distance`` from the original
    (relative Frobenius distance: the fingerprint of a quantized copy never matches, so the weights
    are compared). Returns each module's distance."""
    check_architecture(full, served)
    out = {}
    for name in names:
        d = served_module(full, served, name).distance
        if not d <= max_distance:
            raise SvdServeError(f"--served-base {served.path}: {name} differs from the adapter's base by "
                                f"{d:.3f} of its norm (at most {max_distance} for a quantized copy of it): "
                                "it is another model")
        out[name] = d
    return out


def output_norm(y: Tensor, cov: Tensor) -> float:
    """``‖Y X‖_F / √N = √tr(Y C Yᵀ)`` of a dense ``Y [m, n]`` for inputs of second moment ``C``."""
    return float(((y @ cov) * y).sum().clamp_min(0).sqrt())


class ModuleFit:
    """One module's problem, decomposed once for any number of ranks: ``M L = U Σ Vᵀ`` with ``L Lᵀ`` the
    damped second moment (:func:`svd_serve.linalg.damped`, Cholesky: any square root gives the same
    truncation, :func:`svd_serve.linalg.output_minor` says why, and it is several times cheaper than
    the eigendecomposition), so that the best rank-K factors are ``(Vᵀ_K L⁻¹, U_K Σ_K)``, rebalanced by
    :func:`svd_serve.linalg.compress`. Dense ``m x n`` float64, one module at a time: ``E`` is full
    rank, so ``M`` has no smaller factors. Inputs the calibration never reached (``C = 0``) get the
    Frobenius fit."""

    def __init__(self, delta: LowRank, mod: ServedModule, cov: Tensor, damp: float = DAMP):
        self.cov = cov.detach().double().cpu()
        self.root = None
        if self.cov.diagonal().mean() > 0:
            self.root, info = torch.linalg.cholesky_ex(damped(self.cov, damp))
            if info:
                raise SvdServeError("the calibration inputs' second moment is singular: damp it (damp > 0)")
        d = delta.dense().double()
        self.target = d + mod.error  # M
        weighed = self.target @ self.root if self.root is not None else self.target
        self.u, self.s, self.vh = torch.linalg.svd(weighed, full_matrices=False)
        self.distance = mod.distance
        self.adapted = output_norm(mod.weight + d, self.cov)  # ‖(W + ΔW) X‖
        self.plain = output_norm(mod.error, self.cov)  # ‖E X‖: the exact ΔW (or no adapter) on the served base
        self.adapter = output_norm(d, self.cov)  # ‖ΔW X‖

    def factors(self, rank: int) -> tuple[Compressed, dict]:
        """The best factors of rank ``≤ rank`` and their errors (:func:`aware_module`)."""
        k = min(rank, exact_rank(self.s))
        a = self.vh[:k] if self.root is None else torch.linalg.solve_triangular(
            self.root, self.vh[:k], upper=False, left=False)  # Vᵀ_K L⁻¹
        c = compress(a, self.u[:, :k] * self.s[:k])
        gap = output_norm(self.target - c.factors.dense().double(), self.cov)
        scale = self.adapted if self.adapted > 0 else 1.0
        errors = {"rank": c.rank, "distance": self.distance, "plain": self.plain / scale, "aware": gap / scale,
                  "adapter": self.adapter / scale}
        return c, {**errors, "_abs": (self.plain, gap, self.adapted)}


def aware_module(delta: LowRank, mod: ServedModule, cov: Tensor, rank: int,
                 damp: float = DAMP) -> tuple[Compressed, dict]:
    """The rank-``≤ rank`` factors written against the served base for one module, and its errors:
    ``plain`` (the exact ΔW on the served base, ``‖E X‖``; the base alone has the same output error),
    ``aware`` (``‖(M − B'A') X‖``) and ``adapter`` (``‖ΔW X‖``), each relative to ``‖(W + ΔW) X‖``
    (undamped second moment), ``rank`` and ``distance`` (``‖E‖/‖W‖``)."""
    return ModuleFit(delta, mod, cov, damp).factors(rank)


def aware_factors(full: Weights, served: Weights, deltas: dict[str, LowRank], covariances: dict[str, Tensor],
                  max_rank: int | None = None, extra_rank: int = 0, damp: float = DAMP,
                  max_distance: float = MAX_DISTANCE) -> tuple[dict[str, Compressed], dict]:
    """Each module's LoRA against the served base (module docstring) and the report.

    ``deltas``: each module's exact ``ΔW`` against ``full`` (``AdapterSet.deltas()``, or their factors);
    ``covariances``: each module's input second moment on the calibration rows, of the full-precision
    adapted model (:func:`calibration`); ``max_rank``: ``K`` of every module, default the exact rank of
    its ``ΔW`` plus ``extra_rank`` (the adapter's ``r``). The served base is checked on the way
    (:func:`check_served`). The report: the served base (path, quantization, fingerprint of its
    dequantized target weights), each module's rank, distance and output errors
    (:func:`aware_module`), and the totals (root of summed squares over root of summed squared
    references, over modules)."""
    return aware_sweep(full, served, deltas, covariances, [(max_rank, extra_rank)], damp, max_distance)[0]


def aware_sweep(full: Weights, served: Weights, deltas: dict[str, LowRank], covariances: dict[str, Tensor],
                ranks: list[tuple[int | None, int]], damp: float = DAMP,
                max_distance: float = MAX_DISTANCE) -> list[tuple[dict[str, Compressed], dict]]:
    """:func:`aware_factors` for several ``(max_rank, extra_rank)`` at the cost of one: each module is
    read and decomposed once (:class:`ModuleFit`)."""
    if any(k is not None and k < 1 for k, _ in ranks):
        raise SvdServeError("--max-rank must be at least 1")
    missing = [n for n in deltas if n not in covariances]
    if missing:
        raise SvdServeError(f"no calibration statistics for module {missing[0]}")
    check_architecture(full, served)
    out = [({}, {}, [0.0, 0.0, 0.0]) for _ in ranks]
    samples = []
    for name in sorted(deltas):
        mod = served_module(full, served, name)
        if not mod.distance <= max_distance:
            check_served(full, served, [name], max_distance)  # raises, with the message
        delta = getattr(deltas[name], "factors", deltas[name])  # a Compressed or its LowRank
        fit = ModuleFit(delta, mod, covariances[name], damp)
        exact = exact_rank(factored_svd(*delta)[1])
        for (max_rank, extra), (factors, modules, sums) in zip(ranks, out):
            factors[name], errors = fit.factors(max_rank if max_rank is not None else max(1, exact + extra))
            for i, v in enumerate(errors.pop("_abs")):
                sums[i] += v * v
            modules[name] = errors
        wq = mod.weight - mod.error
        samples.append((name, tuple(wq.shape), wq.reshape(-1)[::fingerprint_stride(wq.numel())]))
    base = {"path": str(Path(served.path).resolve()), "quantization": quantization(served),
            "fingerprint": fingerprint_digest(samples)}
    results = []
    for (max_rank, extra), (factors, modules, sums) in zip(ranks, out):
        ref = math.sqrt(sums[2]) or 1.0
        results.append((factors, {
            "served_base": base, "max_rank": max_rank, "extra_rank": extra, "damp": damp,
            "normalization": NORMALIZATION, "modules": modules,
            "total": {"plain": math.sqrt(sums[0]) / ref, "aware": math.sqrt(sums[1]) / ref,
                      "max_distance": max((m["distance"] for m in modules.values()), default=0.0)}}))
    return results


def served_table(report: dict) -> list[str]:
    """Per module type: how many, the rank, the mean distance to the original, and the mean output error
    of the plain and the aware export on the served base (relative to the adapted module's output)."""
    kinds: dict[str, list] = {}
    for name, m in report["modules"].items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(m)
    lines = [f"  {'module type':<14}{'n':>4}{'rank':>6}  {'‖E‖/‖W‖':>9}  {'plain':>10}{'aware':>10}"]
    for kind, items in kinds.items():
        mean = lambda key: sum(m[key] for m in items) / len(items)  # noqa: E731
        lines.append(f"  {kind:<14}{len(items):>4}{max(m['rank'] for m in items):>6}  {mean('distance'):>9.3f}  "
                     f"{mean('plain'):>10.3e}{mean('aware'):>10.3e}")
    t, n = report["total"], len(report["modules"])
    distance = sum(m["distance"] for m in report["modules"].values()) / max(n, 1)
    lines.append(f"  {'total':<14}{n:>4}{'':>6}  {distance:>9.3f}  "
                 f"{t['plain']:>10.3e}{t['aware']:>10.3e}")
    return lines


def adapter_rank(adapters) -> int:
    """The ``r`` of a loaded :class:`svd_serve.adapter.AdapterSet` (its ``rank`` option; 0 for methods
    without one): the default ``K`` adds it to each module's exact rank."""
    return int(adapters.config.options.get("rank") or 0)


def calibration(calib_data: str | Path | None, base: str | Path, names: list[str],
                deltas: dict[str, LowRank]) -> dict[str, Tensor]:
    """Each module's input second moment over the rows of ``calib_data``, of the full-precision base at
    ``base`` with the exact ``deltas`` added (the model the served one should reproduce); loads it once."""
    from .calib import truncation_weights

    if calib_data is None:
        raise SvdServeError(CALIB_NEEDED)
    if not Path(calib_data).is_file():
        raise SvdServeError(f"--calib-data: data file not found: {calib_data}")
    return truncation_weights("activation", calib_data, base, names, deltas).covariances


def served_adapter(name: str, path: str | Path, adapters, full: Weights, served: Weights,
                   calib_data: str | Path | None, max_rank: int | None = None):
    """:class:`svd_serve.converters.ExportedAdapter` of a loaded adapter set written against the served
    base: the factors of :func:`aware_factors` (``rel_error`` 0: they are what is meant to be written;
    the export checks the written files against them) and the report in ``served``."""
    from .converters import ExportedAdapter

    deltas = {n: d.factors for n, d in adapters.deltas().items()}
    check_served(full, served, list(deltas))
    covs = calibration(calib_data, full.path, list(deltas), deltas)
    factors, report = aware_factors(full, served, deltas, covs, max_rank, adapter_rank(adapters))
    return ExportedAdapter(name=name, path=Path(path), config=adapters.config.__dict__.copy(),
                           A={n: f.A for n, f in factors.items()}, B={n: f.B for n, f in factors.items()},
                           rel_error={n: 0.0 for n in factors}, served=report)
