"""``svd-serve extract``: a native adapter from a full fine-tune, ``ΔW = SVD_K(W_ft − W_base)`` per
target Linear — Eckart–Young optimal for its rank, as ``mergekit-extract-lora``
(``A = √Σ Vᵀ``, ``B = U √Σ``). ``--rank K`` keeps K components in every module; ``--energy e`` keeps,
per module, the fewest components holding a fraction ``e`` of ``‖ΔW‖_F²``. Modules the fine-tune
left unchanged are left out; other changed parameters (embeddings, norms, biases) are reported,
since an adapter cannot carry them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import SvdServeError
from .io import check_out
from .merge import delta_adapter
from .model import load_base, resolve_targets


def truncation(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many of the descending singular values ``s`` to keep."""
    if rank is not None:
        return min(rank, s.numel())
    cum = (s.square().cumsum(0) / s.square().sum()).tolist()
    return next((i + 1 for i, c in enumerate(cum) if c >= energy * (1 - 1e-12)), s.numel())


@torch.no_grad()
def extract(base: str | Path, finetuned: str | Path, out: str | Path, rank: int | None = None,
            energy: float | None = None, targets: str = "all-linear", overwrite: bool = False) -> dict:
    if (rank is None) == (energy is None):
        raise SvdServeError("give exactly one of --rank K and --energy E")
    if rank is not None and rank < 1:
        raise SvdServeError("--rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise SvdServeError(f"--energy {energy} must be in (0, 1]")
    inputs = [base, finetuned]
    check_out(out, inputs, overwrite)
    model, tuned = load_base(base), load_base(finetuned)
    if type(model) is not type(tuned):
        raise SvdServeError(f"the fine-tune is a {type(tuned).__name__}, the base a {type(model).__name__}")
    names = resolve_targets(model, targets)
    tuned_modules = dict(tuned.named_modules())
    factors, errors, unchanged = {}, {}, 0
    for name in names:
        mod = tuned_modules.get(name)
        w0 = model.get_submodule(name).weight
        if not isinstance(mod, nn.Linear) or mod.weight.shape != w0.shape:
            raise SvdServeError(f"module {name} differs in kind or shape between base and fine-tune: "
                                "not a fine-tune of this base")
        diff = mod.weight.double() - w0.double()
        if not diff.any():
            unchanged += 1
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        k = truncation(s, rank, energy)
        errors[name] = float(s[k:].square().sum() / s.square().sum()) ** 0.5
        root = s[:k].sqrt()
        factors[name] = ((root[:, None] * vh[:k]).float(), (u[:, :k] * root).float())
    if not factors:
        raise SvdServeError(f"the fine-tune does not differ from the base in any of the {len(names)} target modules")
    targeted = {f"{n}.weight" for n in names}
    base_params = dict(model.named_parameters())
    other = [n for n, p in tuned.named_parameters()
             if n not in targeted and (n not in base_params or not torch.equal(p, base_params[n]))]
    delta_adapter(model, factors, str(base), targets).save(out, inputs, overwrite)
    return {"modules": len(factors), "unchanged": unchanged, "out": str(out),
            "rank": max(a.shape[0] for a, _ in factors.values()),
            "max_rel_error": max(errors.values()), "rel_errors": errors, "other_changed": other}
