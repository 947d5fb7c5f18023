"""Input covariances ``C = Σ xᵀx / N`` of target Linears over calibration data (CorDA, KORE)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import encode


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], rows: list[dict], tokenizer,
                      max_length: int = 512) -> dict[str, Tensor]:
    """One example at a time (no padding enters the statistics); float64 accumulation."""
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
