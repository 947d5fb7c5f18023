"""The frozen base sharded over the ranks of a run (``--fsdp``), with torch's FSDP2 (``fully_shard``).

Each decoder layer is one FSDP unit and the root holds the rest (embeddings, final norm, head), so a
rank keeps 1/N of every weight (rows ``chunk(N)[rank]`` of dim 0) and gathers one unit at a time for
its forward and backward. The base is loaded sharded: the model is built with its parameters on the
``meta`` device (buffers, such as the rotary frequencies, built as usual), sharded, and each rank
reads the checkpoint one tensor at a time (:class:`svd_serve.weights.Weights`) and keeps its rows of
it, so no rank ever holds more than its shards plus one whole tensor.

The adapter is not sharded: it is attached after sharding, outside every FSDP unit's parameters, and
replicated on every rank exactly as in data-parallel runs (:class:`~.distributed.Processes` sums its
gradients). It is a few MB where the base is GB, and replicated it needs nothing new for the
optimizer, checkpoints, resume or the final adapter. Everything that reads the base's weights whole
reads them from the checkpoint (:func:`whole`): the SVD inits and the base fingerprint, computed by
every rank from the same bytes, so every rank starts from the same adapter as a one-process run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SvdServeError
from ..model import AbsorbedLinear, AdaptedLinear, check_base_dir, parameters_on_meta, set_module
from ..weights import Weights, return_freed_memory
from .distributed import Processes

_CHECKPOINT = "_svd_serve_checkpoint"  # the model attribute holding its Weights


def load_sharded(path, dtype: torch.dtype, procs: Processes) -> nn.Module:
    """The causal LM at ``path`` in ``dtype``, sharded over ``procs``' ranks, on ``procs.device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ckpt = Weights(check_base_dir(path))
    # every step gathers and frees each unit's weights: buffers malloc would otherwise keep, in a heap
    # that fragments (weights.py), until the process holds about the whole base after all (measured).
    # Buffers under 1 MiB still come from that heap: a base of such small matrices keeps more.
    return_freed_memory()
    model = _build_with_meta_parameters(ckpt, dtype)
    model.requires_grad_(False)
    mesh = init_device_mesh(procs.device.type, (procs.world,))
    units = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise SvdServeError(f"--fsdp: {type(model).__name__} names no decoder layer class to shard by")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=procs.device)  # this rank's shards, and empty buffers: the built ones back
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():  # (tied weights once)
            if name not in ckpt.tensors:
                raise SvdServeError(f"--fsdp: {path} has no tensor {name} (a checkpoint whose names "
                                    "differ from the model's cannot be loaded sharded)")
            _fill_shard(p, _read(ckpt, name, dtype), procs)
    setattr(model, _CHECKPOINT, ckpt)
    return model.eval()


def _build_with_meta_parameters(ckpt: Weights, dtype: torch.dtype) -> nn.Module:
    """``ckpt``'s causal LM, its parameters on ``meta``: built as ``from_pretrained`` builds it
    (``dtype``, the default attention), its buffers real."""
    from transformers import AutoModelForCausalLM

    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(ckpt.config, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SvdServeError(f"cannot build {ckpt.path} as a causal LM: {str(e).splitlines()[0]}") from None
    return model


def _read(ckpt: Weights, name: str, dtype: torch.dtype) -> Tensor:
    """The checkpoint's tensor ``name`` as :func:`svd_serve.model.load_base` loads it (floating
    tensors in ``dtype``)."""
    tensor = ckpt.read(name)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _fill_shard(param: Tensor, full: Tensor, procs: Processes) -> None:
    """Copy this rank's rows of ``full`` (FSDP2's ``Shard(0)``: ``full.chunk(world)[rank]``, empty
    past the last chunk) into the sharded parameter ``param``."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),) or tuple(param.shape) != tuple(full.shape):
        raise RuntimeError(f"unexpected sharding {param.placements} {list(param.shape)} of a {list(full.shape)}")
    chunks = full.chunk(procs.world, 0)
    mine = chunks[procs.rank] if procs.rank < len(chunks) else full[:0]
    local = param.to_local()
    if local.shape != mine.shape:
        raise RuntimeError(f"shard of {list(local.shape)} for rows {list(mine.shape)}")
    local.copy_(mine)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, _CHECKPOINT)


def whole(model: nn.Module):
    """``model`` as the adapter's construction and checks read it (``AdapterSet.create``,
    ``AdapterSet.check_base``): the model itself, or for a sharded one a stand-in whose Linear
    weights are read whole from its checkpoint, one module at a time, in the run's dtype, and whose
    class name is the model's (the adapter records it as the architecture)."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    arch = next(c.__name__ for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return type(arch, (_Whole,), {})(model)


class _Whole:
    """A sharded model's structure, with its checkpoint's whole weights (see :func:`whole`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.ckpt: Weights = getattr(model, _CHECKPOINT)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def _view(self, name: str, module: nn.Module):
        return _WholeLinear(self, name, module) if isinstance(module, nn.Linear) else module

    def named_modules(self):
        for name, module in self.model.named_modules():
            yield name, self._view(name, module)

    def get_submodule(self, name: str):
        return self._view(name, self.model.get_submodule(name))

    def fingerprint(self, names) -> str:
        return self.ckpt.fingerprint(names)

    def weight(self, name: str) -> Tensor:
        self.ckpt.weight_info(name)  # (its shape checked against the config)
        return _read(self.ckpt, f"{name}.weight", self.dtype)


class _WholeLinear:
    """One Linear of :class:`_Whole`: its weight's shape, and its data read on ``detach()``."""

    def __init__(self, whole: _Whole, name: str, module: nn.Linear):
        self.weight = _WholeWeight(whole, name, module.weight.shape)


class _WholeWeight:
    def __init__(self, whole: _Whole, name: str, shape: torch.Size):
        self.whole, self.name, self.shape = whole, name, torch.Size(shape)

    def detach(self) -> Tensor:
        return self.whole.weight(self.name)


@torch.no_grad()
def absorb_frozen_sharded(model: nn.Module, procs: Processes) -> None:
    """:func:`svd_serve.model.absorb_frozen` for a sharded model: each adapted weight is read whole
    from the checkpoint, takes the frozen term there exactly as the unsharded weight would, and this
    rank keeps its rows of it."""
    from ..linalg import add_low_rank_

    me = whole(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, AdaptedLinear):
            frozen = mod.adapter.frozen_factors()
            if frozen is not None:
                weight = me.weight(name)
                add_low_rank_(weight, *frozen)
                _fill_shard(mod.base.weight, weight, procs)
                del weight
            set_module(model, name, AbsorbedLinear(mod.base, mod.adapter))
