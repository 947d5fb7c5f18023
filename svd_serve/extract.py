"""``svd-serve extract``: a native adapter from a full fine-tune, ``ΔW = SVD_K(W_ft − W_base)`` per
target Linear — Eckart–Young optimal for its rank, as ``mergekit-extract-lora``
(``A = √Σ Vᵀ``, ``B = U √Σ``). ``--rank K`` keeps K components in every module; ``--energy e`` keeps,
per module, the fewest components holding a fraction ``e`` of ``‖ΔW‖_F²``. Modules the fine-tune
left unchanged are left out; other changed tensors (embeddings, norms, biases) are reported,
since an adapter cannot carry them. Both checkpoints are read one tensor at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapter import delta_adapter
from .calib import check_weighting, module_errors, truncation_weights
from .weights import Weights, return_freed_memory
from .errors import SvdServeError
from .files import check_out
from .hub import resolve
from .linalg import LowRank
from .model import resolve_targets


def truncation(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many of the descending singular values ``s`` to keep."""
    if rank is not None:
        return min(rank, s.numel())
    cum = (s.square().cumsum(0) / s.square().sum()).tolist()
    return next((i + 1 for i, c in enumerate(cum) if c >= energy * (1 - 1e-12)), s.numel())


def same_tensor(base: Weights, tuned: Weights, name: str, block: int = 1 << 24) -> bool:
    """Whether tensor ``name`` has the same values in both (in float32, as loaded models would
    compare, ``block`` values at a time when the dtypes differ)."""
    a, b = base.read(name), tuned.read(name)
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    return all(torch.equal(a[i:i + block].float(), b[i:i + block].float()) for i in range(0, a.numel(), block))


@torch.no_grad()
def extract(base: str | Path, finetuned: str | Path, out: str | Path, rank: int | None = None,
            energy: float | None = None, targets: str = "all-linear", overwrite: bool = False,
            weighting: str = "none", calib_data: str | Path | None = None, revision: str | None = None,
            finetuned_revision: str | None = None) -> dict:
    """``base`` and ``finetuned``: local directories or Hugging Face Hub ids at ``revision`` and
    ``finetuned_revision`` (:mod:`svd_serve.hub`). ``weighting`` and ``calib_data`` choose how each module's difference is truncated
    (:func:`svd_serve.calib.truncation_weights`: the statistics of the fine-tuned model on the
    calibration rows; loads it), with ``energy`` then a fraction of the weighted norm, and add each
    module's output error on those rows to the report."""
    if (rank is None) == (energy is None):
        raise SvdServeError("give exactly one of --max-rank K and --energy E")
    if rank is not None and rank < 1:
        raise SvdServeError(f"--max-rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SvdServeError(f"--energy {energy} must be in (0, 1]")
    check_weighting(weighting, calib_data, True)
    source = resolve(base, revision)
    base, finetuned = source.path, resolve(finetuned, finetuned_revision, flag="--finetuned-revision").path
    inputs = [base, finetuned]
    check_out(out, inputs, overwrite)
    return_freed_memory()
    ckpt, tuned = Weights(base), Weights(finetuned)
    if ckpt.architecture != tuned.architecture:
        raise SvdServeError(f"the fine-tune is a {tuned.architecture}, the base a {ckpt.architecture}")
    names = resolve_targets(ckpt.skeleton, targets)
    tuned_modules = dict(tuned.named_modules())
    stats = truncation_weights(weighting, calib_data, finetuned, names)
    factors, errors, unchanged, lowered = {}, {}, 0, {}
    for name in names:
        mod = tuned_modules.get(name)
        shape = ckpt.get_submodule(name).weight.shape
        if not isinstance(mod, nn.Linear) or mod.weight.shape != shape:
            raise SvdServeError(f"module {name} differs in kind or shape between base and fine-tune: "
                                "not a fine-tune of this base")
        diff = tuned.weight(name).double() - ckpt.weight(name).double()
        if not diff.any():
            unchanged += 1
            continue
        if stats is not None:  # the weighted problem on factors (I, D) or (D, I) of the difference
            lowered[name] = stats.compress(name, LowRank.of_dense(diff), rank, energy)
            factors[name], errors[name] = lowered[name].factors, lowered[name].rel_error
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        del diff
        k = truncation(s, rank, energy)
        errors[name] = float(s[k:].square().sum() / s.square().sum()) ** 0.5
        root = s[:k].sqrt()
        factors[name] = LowRank((root[:, None] * vh[:k]).float(), (u[:, :k] * root).float())
    if not factors:
        raise SvdServeError(f"the fine-tune does not differ from the base in any of the {len(names)} target modules")
    targeted = {f"{n}.weight" for n in names}
    other = [n for n in tuned.tensors
             if n not in targeted and (n not in ckpt or not same_tensor(ckpt, tuned, n))]
    adapters = delta_adapter(factors, ckpt.architecture, ckpt.fingerprint(list(factors)), source.name, targets)
    adapters.save(out, inputs, overwrite)
    return {"modules": len(factors), "unchanged": unchanged, "out": str(out),
            "rank": max(a.shape[0] for a, _ in factors.values()),
            "max_rel_error": max(errors.values()), "rel_errors": errors, "other_changed": other,
            **({"weighting": weighting, "errors": module_errors(lowered)} if stats is not None else {})}
