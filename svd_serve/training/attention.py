"""Padding-free attention for training: transformers' SDPA attention registered under its own name,
which also takes rows of examples laid back to back (:func:`svd_serve.dataset.collate_flat`), and
computes in float32 around bfloat16 layers on request."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn


SDPA, FLOAT32_SDPA = "svd_serve_sdpa", "svd_serve_sdpa_float32"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # of svd_serve.dataset.collate_flat


def padding_free_sdpa(module, query, key, value, attention_mask, *, float32: bool = False, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' SDPA attention, for a padding-free row too, and in float32 on request.

    With ``cu_seq_lens_q`` (the boundaries of the examples laid back to back in one row, which
    transformers' padding-free batches hand to flash attention; :func:`svd_serve.dataset.collate_flat`
    makes them) the row's queries, keys and values are put into one zero-padded row per example,
    attended causally (the padding comes after each example's tokens, so no token sees it), and the
    outputs taken back: every example attends to itself only, at the cost of the padded batch's
    attention, while the rest of the model runs on the real tokens only. ``float32``: query, key and
    value in float32 with autocast off inside (it would cast them back), the output in the caller's
    dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if float32:
        query, key, value = query.float(), key.float(), value.float()
    slots = None
    if cu_seq_lens_q is not None:
        if query.shape[0] != 1 or cu_seq_lens_k is None or not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
            raise ValueError("padding-free attention needs one row and the same boundaries for keys")
        slots, rows, width = _example_slots(cu_seq_lens_q, int(max_length_q))
        query, key, value = (_example_rows(t, slots, rows, width) for t in (query, key, value))
        attention_mask = None
    with torch.autocast(query.device.type, enabled=False) if float32 else nullcontext():
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if slots is not None:  # [rows, width, heads, dim] -> [1, tokens, heads, dim]
        out = out.reshape(-1, *out.shape[2:]).index_select(0, slots).unsqueeze(0)
    return out.to(dtype), weights


def _example_slots(cu_seq_lens: Tensor, width: int) -> tuple[Tensor, int, int]:
    """Where each token of a padding-free row goes in ``[examples × width]``."""
    cu = cu_seq_lens.to(torch.long)
    rows = cu.numel() - 1
    example = torch.repeat_interleave(torch.arange(rows, device=cu.device), cu.diff())
    position = torch.arange(int(cu[-1]), device=cu.device) - cu[example]
    return example * width + position, rows, width


def _example_rows(t: Tensor, slots: Tensor, rows: int, width: int) -> Tensor:
    """``[1, heads, tokens, dim]`` -> ``[rows, heads, width, dim]``, zero-padded."""
    flat = t[0].transpose(0, 1)  # [tokens, heads, dim]
    padded = flat.new_zeros(rows * width, *flat.shape[1:]).index_copy(0, slots, flat)
    return padded.view(rows, width, *flat.shape[1:]).transpose(1, 2)


def sdpa_attention(model: nn.Module, float32: bool = False) -> bool:
    """Give ``model`` (an SDPA model) :func:`padding_free_sdpa` through transformers' attention
    registry: the same attention, which also takes padding-free rows
    (:func:`svd_serve.dataset.collate_flat`), and with ``float32`` computes in float32 around bfloat16
    layers. False where it cannot (another
    implementation, or a model that does not take one).

    ``float32`` is for bfloat16 training on the CPU: PyTorch's fused CPU attention runs its backward
    pass 3-4x slower in bfloat16 than in float32 (measured on an AVX512-BF16 CPU with torch 2.13,
    head size 64, 50-token rows), a fifth of a SmolLM2-135M training step. The linear layers, where
    bfloat16 pays, stay bfloat16; loss and gradients stay as close to a float32 run's as with
    bfloat16 attention (SmolLM2: loss within 2e-2, adapter gradients within 5 %, both ways)."""
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", SDPA, FLOAT32_SDPA):
        return False
    name = FLOAT32_SDPA if float32 else SDPA
    AttentionInterface.register(name, functools.partial(padding_free_sdpa, float32=float32))
    AttentionMaskInterface.register(name, sdpa_mask)  # the same masks as "sdpa"
    model.set_attn_implementation(name)
    return config._attn_implementation == name


