"""Calibration statistics of target Linears over calibration data, one pass, one example at a time
(no padding enters them), float64 accumulation:

- ``covariance``: the input covariance ``C = Σ xxᵀ / N`` over all tokens (CorDA, KORE; activation-aware
  truncation);
- ``fisher``: the empirical Fisher information summed over each output row,
  ``I_i = Σ_e n_e Σ_j (∂ℓ_e/∂W_ij)² / Σ_e n_e``, with ``ℓ_e`` the mean cross-entropy over the ``n_e``
  target tokens of example ``e`` (FWSVD's per-sample Fisher; FILA's estimate with one example per
  batch). ``∂ℓ_e/∂W = Σ_t g_t x_tᵀ`` (``g_t`` the gradient of the module's output) is reduced to its
  row sums of squares inside a backward hook, so no weight gradient is ever formed and at most one
  module's ``m x n`` exists at a time.

A method declares the statistic its ``init`` receives (``Adapter.statistic``); :func:`calibrate`
computes it. Statistics are of the model as given: the base for an adapter's init, the adapted model
(adapter attached) for the weighted truncation of its ΔW.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .dataset import IGNORE, collate, encode, read_jsonl
from .errors import SvdServeError
from .linalg import DAMP, Compressed, LowRank, Weighting, compress, relative_error


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], rows: list[dict], tokenizer,
                      max_length: int = 512) -> dict[str, Tensor]:
    """``C [n, n]`` per module (float64)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for row in tqdm(rows, desc="calibration", leave=False):
            ids = encode(row, tokenizer, max_length).input_ids
            model(input_ids=torch.tensor([ids], device=model.device))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


def row_sums_of_squares(g: Tensor, x: Tensor) -> Tensor:
    """Per example ``b``, the row sums of ``(g_bᵀ x_b)²`` for ``g [B, T, m]``, ``x [B, T, n]``:
    ``diag(g_bᵀ (x_b x_bᵀ) g_b)`` through the ``T x T`` kernels when ``T < n`` (no ``m x n`` product),
    else from ``g_bᵀ x_b``, one example at a time. ``[B, m]``."""
    if x.shape[1] < x.shape[2]:
        gt = g.transpose(1, 2)
        return ((gt @ (x @ x.transpose(1, 2))) * gt).sum(2)
    return torch.stack([(gb.T @ xb).square().sum(1) for gb, xb in zip(g, x)])


def fisher_rows(model: nn.Module, names: list[str], rows: list[dict], tokenizer, max_length: int = 512,
                batch_size: int = 8) -> dict[str, Tensor]:
    """``I [m]`` per module (float64): the Fisher information of each output row (module docstring).
    Examples are batched (right-padded: padding gets no gradient, so each example's gradient is its
    own); the model's parameters get no gradients, their ``requires_grad`` flags are restored."""
    sums = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}  # (any Linear)
    counts = [torch.zeros(0)]  # n_e of the examples in flight

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().double()

            def on_grad(g):
                per_example = row_sums_of_squares(g.detach().double(), x)
                sums[name] += (counts[0].to(per_example) @ per_example).cpu()
            output.register_hook(on_grad)
        return fn

    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    embed = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    examples = [encode(r, tokenizer, max_length) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for i in tqdm(range(0, len(examples), batch_size), desc="fisher", leave=False):
            batch = collate(examples[i:i + batch_size], pad)
            labels = batch["labels"][:, 1:].to(model.device)
            targets = labels != IGNORE
            counts[0] = targets.sum(1).double()
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits[:, :-1]
            ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none") * targets
            (ce.sum(1) / counts[0].clamp_min(1)).sum().backward()  # Σ_e ℓ_e: each example's own gradient
    finally:
        for h in [embed, *handles]:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    total = sum(e.n_targets for e in examples)
    return {n: s / max(total, 1) for n, s in sums.items()}


def relative_fisher(forget: dict[str, Tensor], retain: dict[str, Tensor], damp: float = DAMP) -> dict[str, Tensor]:
    """FILA's relative importance ``I_f / I_r`` per row, the retain Fisher damped by ``damp`` times its
    mean (FILA divides element-wise and then sums a row; the ratio of row sums needs only the rows). A
    module the reference data never reached keeps ``I_f``."""
    return {n: forget[n] / (retain[n] + damp * retain[n].mean()) if retain[n].mean() > 0 else forget[n]
            for n in forget}


# rows of --data a method that takes a statistic if given (KaSA's default) uses without --calib-data (kasa.py says it)
TRAINING_ROWS = 128
STATISTICS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "covariance": input_covariances,
    "fisher": fisher_rows,
}


def calibrate(statistic: str, model: nn.Module, names: list[str], rows: list[dict], tokenizer,
              max_length: int = 512, reference: list[dict] | None = None) -> dict[str, Tensor]:
    """``statistic`` (a key of :data:`STATISTICS`) of every module in ``names`` over ``rows``. With
    ``reference`` rows, the Fisher is relative to theirs (:func:`relative_fisher`: what the
    calibration data needs over what the reference data needs)."""
    stats = STATISTICS[statistic](model, names, rows, tokenizer, max_length)
    if reference and statistic == "fisher":
        stats = relative_fisher(stats, fisher_rows(model, names, reference, tokenizer, max_length))
    return stats


# --- weighted truncation -------------------------------------------------------------------------------
WEIGHTINGS = ("none", "fisher", "activation")
WEIGHTING_HELP = ("How a lowered rank is chosen: none (the best in Frobenius norm), fisher (FWSVD: output rows "
                  "weighted by their Fisher information) or activation (the output error on the calibration "
                  "inputs). fisher and activation need --calib-data.")
CALIB_HELP = ("JSONL rows for --weighting; with it (any weighting) each module's output error on these rows is "
              "reported beside its Frobenius error. Loads the model once for a forward (and, for fisher, "
              "backward) pass over the rows; the truncation itself stays in factor space.")


@dataclass
class TruncationWeights:
    """What a weighted truncation (``--weighting`` over ``--calib-data``) needs of one model, from one pass
    over the data: every module's input covariance (the output error is measured on it, ``activation``
    weights by it) and, for ``fisher``, its Fisher row sums. The weightings themselves are built one
    module at a time (:meth:`compress`). ``none`` truncates plainly and still measures the output error."""

    kind: str
    covariances: dict[str, Tensor]
    fisher: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def collect(cls, kind: str, model: nn.Module, names: list[str], rows: list[dict], tokenizer,
                max_length: int = 512) -> "TruncationWeights":
        if kind not in WEIGHTINGS:
            raise SvdServeError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, not {kind!r}")
        fisher = fisher_rows(model, names, rows, tokenizer, max_length) if kind == "fisher" else {}
        return cls(kind, input_covariances(model, names, rows, tokenizer, max_length), fisher)

    def weighting(self, name: str) -> Weighting | None:
        if self.kind == "fisher":
            return Weighting.fisher(self.fisher[name])
        if self.kind == "activation":
            return Weighting.activation(self.covariances[name])
        return None

    def compress(self, name: str, delta: LowRank, max_rank: int | None = None,
                 energy: float | None = None) -> Compressed:
        """Module ``name``'s ``ΔW = B A`` truncated in this weighting, with its output error."""
        c = compress(*delta, max_rank=max_rank, energy=energy, weighting=self.weighting(name))
        measure = Weighting.activation(self.covariances[name], damp=None)
        return dataclasses.replace(c, output_error=relative_error(delta, c.factors, measure) if c.rel_error else 0.0)


def check_weighting(kind: str, calib_data: str | Path | None, lowers_rank: bool) -> None:
    """Refuse a bad ``--weighting``/``--calib-data`` before any work: an unknown weighting, a weighting
    without data, or either where nothing lowers a rank."""
    if kind not in WEIGHTINGS:
        raise SvdServeError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, not {kind!r}")
    if kind != "none" and calib_data is None:
        raise SvdServeError(f"--weighting {kind} needs --calib-data (its statistics come from the model on "
                            "calibration rows)")
    if calib_data is not None and not lowers_rank:
        raise SvdServeError("--weighting and --calib-data choose how a rank is lowered: they go with --max-rank")
    if calib_data is not None and not Path(calib_data).is_file():
        raise SvdServeError(f"--calib-data: data file not found: {calib_data}")


def truncation_weights(kind: str, calib_data: str | Path | None, model_dir: str | Path, names: list[str],
                       deltas: dict[str, LowRank] | None = None, max_length: int = 512) -> TruncationWeights | None:
    """What ``--weighting kind --calib-data FILE`` of a rank-lowering command needs (None without
    calibration data; :func:`check_weighting` first): the statistics of the model at ``model_dir``
    (float32) with the exact low-rank ``deltas`` added to its modules where given (the model the
    truncated ΔW serves), over the rows of ``calib_data``, for the modules ``names``."""
    if calib_data is None:
        return None
    from .model import LowRankDelta, attach, detach, load_base, load_tokenizer

    rows = read_jsonl(calib_data)
    if not rows:
        raise SvdServeError(f"{calib_data}: no calibration rows")
    model, tokenizer = load_base(model_dir), load_tokenizer(model_dir)
    model.eval()
    if deltas:
        attach(model, {n: LowRankDelta(*d.float()) for n, d in deltas.items()})
    try:
        return TruncationWeights.collect(kind, model, names, rows, tokenizer, max_length)
    finally:
        if deltas:
            detach(model)


def lower_rank(weights: TruncationWeights | None, name: str, delta: LowRank, max_rank: int | None = None,
               energy: float | None = None) -> Compressed:
    """Module ``name``'s ``ΔW = B A`` at ``max_rank`` (or ``energy``): in the weighting of ``weights``
    with its output error measured (:meth:`TruncationWeights.compress`), or plainly without them."""
    if weights is not None:
        return weights.compress(name, delta, max_rank, energy)
    return compress(*delta, max_rank=max_rank, energy=energy)


def module_errors(compressed: dict[str, Compressed]) -> dict[str, list]:
    """``{module: [Frobenius error, output error or None]}`` for a command's report."""
    return {n: [c.rel_error, c.output_error] for n, c in compressed.items()}


def truncation_table(errors: dict[str, list]) -> list[str]:
    """Per module type (``q_proj``, ...) of :func:`module_errors`: how many modules, the mean and max
    relative Frobenius error and output error on the calibration rows (where measured), and the
    module of the largest output error."""
    kinds: dict[str, list] = {}
    for name, (frob, out) in errors.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((name, frob, out))
    lines = [f"  {'module type':<14}{'n':>4}  {'Frobenius mean':>15}{'max':>10}  {'output mean':>12}{'max':>10}"
             "  worst module"]
    for kind, items in kinds.items():
        frob = [f for _, f, _ in items]
        out = [o for _, _, o in items if o is not None]
        worst = max(items, key=lambda x: x[2] if x[2] is not None else x[1])[0]
        measured = f"{sum(out) / len(out):>12.3e}{max(out):>10.3e}" if out else f"{'-':>12}{'-':>10}"
        lines.append(f"  {kind:<14}{len(items):>4}  {sum(frob) / len(frob):>15.3e}{max(frob):>10.3e}  {measured}  {worst}")
    return lines
