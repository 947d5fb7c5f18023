"""``svd-serve export``: adapters → exact low-rank ΔW against the original base → a target's files,
with numerical checks of what is written.

The base is never loaded for the export itself: an adapter's ΔW needs only the adapter file, and
the base is read only for the fingerprint check (a sample of each target weight,
:meth:`svd_serve.weights.Weights.fingerprint`). Every export is checked per module, in factor
space, before anything is written: the exported factors ``B' A'`` against the adapter's exact
``ΔW = B A`` (relative Frobenius error through a QR of the stacked factors, no ``m x n`` matrix),
and the relative output error ``‖(ΔW − B' A') X‖ / ‖ΔW X‖`` on random inputs. The end-to-end check
(the float32 base with the written factors against the adapted model, max |Δ logits|) loads the
model: it runs by default when the checkpoint's weights take at most
:data:`CHECK_LOGITS_MAX_BYTES`, and always with ``check_logits=True`` (``--check-logits``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapter import AdapterSet
from .calib import check_weighting, truncation_weights
from .converters import ExportedAdapter, ExportJob, get_target
from .errors import SvdServeError
from .files import check_finite, check_out
from .hub import resolve
from .linalg import LowRank, factored_svd
from .model import LowRankDelta, linear_names, load_base
from .served import CALIB_NEEDED, open_served, served_adapter
from .weights import Weights, return_freed_memory

CHECK_LOGITS_MAX_BYTES = 256 << 20  # the logits check's default: on up to this checkpoint size
CHECK_INPUTS = 16  # random input vectors of the per-module output check
CHECK_RTOL = 1e-5  # accepted excess of the factor error over the reported truncation error (float32 factors)


@torch.no_grad()
def factor_errors(exact: LowRank, written: LowRank, seed: int = 0) -> tuple[float, float]:
    """``(‖ΔW − B'A'‖_F / ‖ΔW‖_F, ‖(ΔW − B'A') X‖_F / ‖ΔW X‖_F)`` for ``ΔW = B A`` (``exact``) and
    ``written = (A', B')``, ``X`` Gaussian ``[n, CHECK_INPUTS]``; float64, in factor space. For a zero
    ``ΔW`` the absolute norms are returned."""
    (a, b), (a2, b2) = exact, written
    diff = factored_svd(torch.cat([a, a2]), torch.cat([b, -b2], 1))[1].norm()
    ref = factored_svd(a, b)[1].norm()
    x = torch.randn(a.shape[1], CHECK_INPUTS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = b.double() @ (a.double() @ x)
    y_gap = (y - b2.double() @ (a2.double() @ x)).norm()
    return (float(diff / ref) if ref > 0 else float(diff)), (float(y_gap / y.norm()) if y.norm() > 0 else float(y_gap))


def check_factors(exported: ExportedAdapter, adapters: AdapterSet) -> dict:
    """Every module's exported factors against the adapter's exact ΔW; raises if any error exceeds
    the truncation error ``export`` reported for it (plus float32 rounding)."""
    factor_err, output_err = 0.0, 0.0
    for name, layer in adapters.items():
        f, o = factor_errors(layer.delta(), LowRank(exported.A[name], exported.B[name]))
        if f > exported.rel_error[name] + CHECK_RTOL:
            raise SvdServeError(f"export check failed for {exported.name}: module {name} is written with "
                                f"relative error {f:.3e}, expected {exported.rel_error[name]:.3e}")
        factor_err, output_err = max(factor_err, f), max(output_err, o)
    return {"max_factor_error": factor_err, "max_output_error": output_err}


@torch.no_grad()
def logits_gap(model: nn.Module, first: dict[str, nn.Module], second: dict[str, nn.Module],
               seed: int = 0) -> float:
    """Max |logits| difference of ``model`` with two sets of per-module deltas, on random tokens."""
    from .model import attach, detach

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    outs = []
    for deltas in (first, second):
        attach(model, deltas)
        try:
            outs.append(model(input_ids=ids).logits.float())
        finally:
            detach(model)
    return float((outs[0] - outs[1]).abs().max())


def export(target: str, base: str | Path, adapter_dirs: list[str | Path], out: str | Path,
           max_rank: int | None = None, verify: bool = True, check_logits: bool | None = None,
           overwrite: bool = False, weighting: str = "none", calib_data: str | Path | None = None,
           served_base: str | Path | None = None, revision: str | None = None,
           served_base_revision: str | None = None, **options) -> dict:
    """Write ``adapter_dirs`` for ``target`` under ``out``; returns a report (ranks, errors, checks).

    ``verify=False`` skips every check; ``check_logits`` None runs the end-to-end logits check when
    the base's weights take at most :data:`CHECK_LOGITS_MAX_BYTES`. ``weighting`` and ``calib_data``
    choose how ``max_rank`` truncates (:func:`svd_serve.calib.truncation_weights`: the statistics of
    the base with each adapter's exact ΔW, on the calibration rows; loads the model) and add each
    module's output error on those rows to the report (``errors``).

    ``served_base``: the (quantized) checkpoint the server runs instead of ``base``; each adapter is
    written as the rank-``max_rank`` factors that best reproduce the adapted model on it, on the inputs
    of the ``calib_data`` rows (:mod:`svd_serve.served`; default rank: each module's exact rank plus the
    adapter's r). The written files are checked against those factors and name the served base; the
    report has each module's output error on the served base, plain and aware (``served_base``).

    ``base`` is a local directory or a Hugging Face Hub id at ``revision`` (:mod:`svd_serve.hub`); the
    written files record it (``base_source``: name, repo id, revision, snapshot commit)."""
    convert = get_target(target).export
    if not adapter_dirs:
        raise SvdServeError("give at least one --adapter")
    if max_rank is not None and max_rank < 1:
        raise SvdServeError("--max-rank must be at least 1")
    if served_base is not None:
        check_served_flags(weighting, calib_data)
    else:
        check_weighting(weighting, calib_data, max_rank is not None)
    names = [Path(p).name for p in adapter_dirs]
    if len(set(names)) != len(names):
        raise SvdServeError(f"adapter directory names must be distinct: {names}")
    source = resolve(base, revision)
    base = source.path
    if served_base is not None:
        served_base = resolve(served_base, served_base_revision, flag="--served-base-revision").path
    elif served_base_revision is not None:
        raise SvdServeError("--served-base-revision goes with --served-base (a Hugging Face Hub id)")
    check_out(out, [base, *adapter_dirs, served_base], overwrite)
    return_freed_memory()
    ckpt = Weights(base)
    sets = [AdapterSet.load(p, ckpt) for p in adapter_dirs]
    if served_base is not None:
        served = open_served(served_base)
        exported = [served_adapter(n, p, s, ckpt, served, calib_data, max_rank)
                    for n, p, s in zip(names, adapter_dirs, sets)]
        return served_export(target, convert, ckpt, served, exported, out, verify, overwrite, options)
    exported = [ExportedAdapter.from_adapter(n, p, s, max_rank, truncation_weights(
                    weighting, calib_data, base, list(s.config.targets), {m: d.factors for m, d in s.deltas().items()}))
                for n, p, s in zip(names, adapter_dirs, sets)]
    for e in exported:
        check_finite([(f"{n}.{k}", t) for n in e.A for k, t in (("A", e.A[n]), ("B", e.B[n]))],
                     f"refusing to export {e.name}")
    checks = {e.name: check_factors(e, s) for e, s in zip(exported, sets)} if verify else {}
    if check_logits is None:
        check_logits = verify and ckpt.nbytes <= CHECK_LOGITS_MAX_BYTES
    model = load_base(base) if check_logits else None
    job = ExportJob(base=Path(base), adapters=exported, linear_modules=linear_names(ckpt.skeleton),
                    architecture=ckpt.architecture, model_type=ckpt.config.model_type,
                    options=options, overwrite=overwrite, base_source=source.record())
    written = dict(convert(job, Path(out)))
    messages = written.pop("messages") if isinstance(written.get("messages"), list) else []
    report = {"target": target, "out": str(out), "adapters": {}, "messages": messages}
    for e, s in zip(exported, sets):
        entry = {"rank": e.rank, "modules": len(e.A), "bound": max(l.rank_bound() for _, l in s.items()),
                 "max_rel_error": max(e.rel_error.values()), **checks.get(e.name, {}), **written.get(e.name, {})}
        if e.errors:
            entry.update(weighting=weighting, errors=e.errors)
        if model is not None:
            native = dict(s.items())
            lowrank = {n: LowRankDelta(e.A[n], e.B[n]) for n in e.A}
            entry["max_logit_gap"] = logits_gap(model, native, lowrank)
        report["adapters"][e.name] = entry
    return report


def check_served_flags(weighting: str, calib_data: str | Path | None) -> None:
    """``--served-base`` weighs by the calibration inputs itself: it needs ``--calib-data`` and takes no
    other ``--weighting``."""
    if weighting not in ("none", "activation"):
        raise SvdServeError(f"--served-base minimises the output error on the calibration inputs (activation "
                            f"weighting); --weighting {weighting} does not go with it")
    if calib_data is None:
        raise SvdServeError(CALIB_NEEDED)
    if not Path(calib_data).is_file():
        raise SvdServeError(f"--calib-data: data file not found: {calib_data}")


def check_written(target: str, out: Path, exported: list[ExportedAdapter]) -> dict[str, dict]:
    """The factors a PEFT reader gets from the written files (``--target peft``, ``vllm``) against
    the factors meant to be written, per module in factor space; raises on any difference beyond
    float32 rounding. ONNX exports are checked by their own runtime (``svd-serve verify``)."""
    from .converters.peft import read_lora

    if target not in ("peft", "vllm"):
        return {}
    checks = {}
    for e in exported:
        read = read_lora(out if target == "peft" else out / e.name)
        worst = 0.0
        for name in e.A:
            if name not in read:
                raise SvdServeError(f"export check failed for {e.name}: module {name} is missing from {out}")
            f, _ = factor_errors(LowRank(e.A[name], e.B[name]), read[name])
            if f > CHECK_RTOL:
                raise SvdServeError(f"export check failed for {e.name}: module {name} is written with relative "
                                    f"error {f:.3e} against the factors for the served base")
            worst = max(worst, f)
        checks[e.name] = {"max_factor_error": worst}
    return checks


def served_export(target: str, convert, full: Weights, served: Weights, exported: list[ExportedAdapter],
                  out: str | Path, verify: bool, overwrite: bool, options: dict) -> dict:
    """The rest of :func:`export` for adapters written against a served base: the target's files name
    the served checkpoint as their base; the written factors are read back and checked."""
    for e in exported:
        check_finite([(f"{n}.{k}", t) for n in e.A for k, t in (("A", e.A[n]), ("B", e.B[n]))],
                     f"refusing to export {e.name}")
    job = ExportJob(base=Path(served.path), adapters=exported, linear_modules=linear_names(full.skeleton),
                    architecture=full.architecture, model_type=full.config.model_type,
                    options=options, overwrite=overwrite)
    written = dict(convert(job, Path(out)))
    messages = written.pop("messages") if isinstance(written.get("messages"), list) else []
    checks = check_written(target, Path(out), exported) if verify else {}
    report = {"target": target, "out": str(out), "adapters": {}, "messages": messages}
    for e in exported:
        report["adapters"][e.name] = {"rank": e.rank, "modules": len(e.A), "served_base": e.served,
                                      **checks.get(e.name, {}), **written.get(e.name, {})}
    return report
