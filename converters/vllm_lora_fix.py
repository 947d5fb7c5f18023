"""Requests without a LoRA on vLLM's CPU backend: index −1 must apply no LoRA.

vLLM marks the tokens of a request without a LoRA with slot index −1. Its Triton kernels (GPU) skip
those tokens; its PyTorch ops (``vllm/lora/ops/torch_ops``, the CPU backend) gather
``lora_weights[indices]``, and −1 selects the LAST slot: once every LoRA slot is taken, a base request
batched with adapter requests is served with the last slot's adapter, silently
(vllm-project/vllm#48421).

:func:`install` checks the installed ops themselves on a tiny input and, only where they still apply a
LoRA at index −1, wraps each faulty op: the op runs on the indices with −1 replaced by 0 (every valid
row computes exactly what it computed before, bit for bit: same shapes, same kernel, per-row
arithmetic), then every row whose index is −1 gets back the output it had before the call, as the
Triton kernels leave it. The wrapper has no data-dependent branch, so it traces under torch.compile.
It runs from the plugin's registration in every vLLM process (API server, engine core, workers), and
the process that builds vLLM's CPU LoRA wrapper says so once in the log.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

logger = logging.getLogger("vllm.plugins.svd_serve")

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # the sgmv_* (prefill) ops call these
# the modules that hold the ops by name: where they are defined, the package, and the CPU wrapper
MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
DISABLE_ENV = "SVD_SERVE_NO_LORA_FIX"  # =1: leave vLLM's ops as they are (to show the bug in tests)


def applies_at_minus_one(name: str, op) -> bool:
    """Whether ``op`` changes the output of a token whose slot index is −1 (two slots, one token)."""
    import torch

    x = torch.ones(1, 2)
    if name == "bgmv_shrink":  # lora_a: [slots, 1, rank, in]
        weights, out, args = torch.ones(2, 1, 3, 2), torch.zeros(1, 3), (1.0,)
    elif name == "bgmv_expand":  # lora_b: [slots, 1, out, rank]
        weights, out, args = torch.ones(2, 1, 3, 2), torch.zeros(1, 3), (True,)
    else:
        weights, out, args = torch.ones(2, 1, 3, 2), torch.zeros(1, 3), (0, 3, True)
    op(x, weights, out, torch.tensor([-1]), *args)
    return bool(out.any())


def skip_minus_one(op):
    """``op`` with tokens at slot index −1 left as they were (op(inputs, weights, output, indices, ...))."""

    @functools.wraps(op)
    def fixed(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        import torch

        keep = (lora_indices_tensor < 0).reshape(-1, *[1] * (output_tensor.dim() - 1))
        before = output_tensor.clone()
        op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        output_tensor.copy_(torch.where(keep, before, output_tensor))

    fixed.svd_serve_fixed = True
    return fixed


def install() -> list[str]:
    """Correct the installed vLLM's PyTorch LoRA ops where they apply a LoRA at index −1; returns the
    names of the ops corrected (empty where vLLM has no such ops or they are right already)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return []
    try:
        import importlib

        ops = importlib.import_module(MODULES[0])
    except ImportError:  # a vLLM without PyTorch LoRA ops
        return []
    fixed = []
    for name in OPS:
        op = getattr(ops, name, None)
        if op is None or getattr(op, "svd_serve_fixed", False) or not applies_at_minus_one(name, op):
            continue
        wrapped = skip_minus_one(op)
        for module in MODULES:
            holder = sys.modules.get(module)
            if holder is None and module == MODULES[1]:
                holder = importlib.import_module(module)
            if holder is not None and getattr(holder, name, None) is op:
                setattr(holder, name, wrapped)
        fixed.append(name)
    if fixed:
        say_when_used(fixed)
    return fixed


def say_when_used(fixed: list[str]) -> None:
    """Log the correction once, from the process that runs LoRA on the CPU: when vLLM builds its CPU
    LoRA wrapper (the API server process, which runs no model, stays quiet)."""
    import importlib

    try:
        cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu").PunicaWrapperCPU
    except (ImportError, AttributeError):
        return
    init = cpu.__init__
    if getattr(init, "svd_serve_fixed", False):
        return

    @functools.wraps(init)
    def logged_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not getattr(cpu, "svd_serve_said", False):
            cpu.svd_serve_said = True
            logger.info("svd-serve: vLLM's PyTorch LoRA ops (%s) apply the last slot's LoRA to requests "
                        "without one (vllm-project/vllm#48421); corrected in this process", ", ".join(fixed))

    logged_init.svd_serve_fixed = True
    cpu.__init__ = logged_init
