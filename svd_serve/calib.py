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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import IGNORE, collate, encode
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
    sums = {n: torch.zeros(model.get_submodule(n).weight.shape[0], dtype=torch.float64) for n in names}
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
