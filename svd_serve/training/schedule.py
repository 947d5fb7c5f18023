"""The data order and the learning-rate schedule: both pure functions of the step, so a resumed run
sees exactly the batches and rates of the uninterrupted one."""

from __future__ import annotations

import functools
import math

import torch

from .config import TrainConfig


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def global_batch(step: int, n: int, size: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a window over one seeded permutation per epoch."""
    out: list[int] = []
    pos = step * size
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        take = min(size - len(out), n - offset)
        out += _epoch_order(n, seed, epoch)[offset:offset + take]
        pos += take
    return out


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine or linear decay to 0 (the lr of update ``step``, 0-based)."""
    warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1.0, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)

