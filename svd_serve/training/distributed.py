"""The processes of a training run: one, or data-parallel ranks under ``torchrun``.

Every ``torch.distributed`` call of svd-serve is here (but FSDP2's, in sharding.py). Each rank holds
the whole frozen base (with ``--fsdp``, its shards of it: sharding.py) and the adapter and takes its
share of every global batch; the adapter gradients are summed across ranks in one all-reduce per
step, so every rank makes the same update, and only rank 0 writes. With one process every
collective is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SvdServeError


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine does not have, in one line (None: the default device)."""
    if not device:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SvdServeError(f"--device {device!r} is not a device: cpu, cuda, cuda:N (or another accelerator "
                            "torch knows, e.g. mps, xpu)") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    available = dev.type == "mps" and torch.backends.mps.is_available() or (
        dev.type != "mps" and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        build = " (this torch is a CPU-only build)" if dev.type == "cuda" and torch.version.cuda is None else ""
        raise SvdServeError(f"--device {device}: no {dev.type} device is available on this machine{build}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise SvdServeError(f"--device {device}: this machine has {count} {dev.type} device(s), "
                            f"{dev.type}:0 to {dev.type}:{count - 1}")


def check_fsdp(cfg) -> None:
    """``--fsdp`` (see sharding.py) needs torchrun's ranks to shard over, and a base it can shard."""
    if not cfg.fsdp:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SvdServeError("--fsdp shards the base over the processes of a torchrun run: run it as "
                            "`torchrun --nproc-per-node N -m svd_serve train --fsdp ...` with N >= 2")
    if getattr(cfg, "quantize", None):
        raise SvdServeError("--fsdp does not shard a quantized base: give --fsdp or --quantize, not both")


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device: str | None = None) -> "Processes":
        """Join torchrun's process group (``WORLD_SIZE > 1``: NCCL on GPUs, gloo on CPU) and pick the
        device: ``device``, else ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank() if world > 1 else 0
        check_device(device)
        if device:
            dev = torch.device(device)
            if dev.type == "cuda" and dev.index is None:  # "cuda": this process's GPU
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif torch.cuda.is_available():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return cls(rank, world, dev)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.master:
            print(*args, **kwargs)

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values in every rank's ``tensors``."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def sum_grads_(self, params: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient (a missing one counts as zero) and ``values`` (a few loss
        sums) over ranks, in one all-reduce; returns the summed values."""
        if self.world == 1:
            return values
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [values.float().reshape(-1)])
        dist.all_reduce(flat)
        n = values.numel()
        for p, chunk in zip(params, flat[:-n].split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p)
        return flat[-n:].view_as(values).to(values.dtype)

    def check_same(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every rank must hold rank 0's values (the updates were the same)."""
        if self.world == 1:
            return
        for name, t in tensors.items():
            ref = t.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, t):
                raise SvdServeError(f"rank {self.rank} diverged from rank 0 at {name}")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
