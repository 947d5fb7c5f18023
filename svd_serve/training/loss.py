"""The losses of a step (cross-entropy, LoKU's inverted hinge), the logits taken only where a target
is predicted, and the probe that picks the cheapest batch layout with the padded batch's loss."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..dataset import IGNORE, Example, collate, collate_flat, collate_packed
from .attention import VARLEN_KEYS


def inverted_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LoKU's inverted hinge loss summed over tokens: ``Σ_t 1 + p(y_t) − max_{v≠y_t} p(v)`` with
    ``p = softmax(logits_t)``. It lowers the target token and raises its strongest rival, so the model
    says something else fluent instead; bounded in [0, 2] (unlike gradient ascent on the likelihood),
    it stops pushing a token once another one is more likely."""
    p = logits.softmax(-1)
    target = p.gather(1, labels[:, None])[:, 0]
    rival = p.scatter(1, labels[:, None], -1.0).amax(1)  # probabilities are >= 0: -1 is never the max
    return (1 + target - rival).sum()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum"),
    "ihl": inverted_hinge,
}


def loss_sum(model: nn.Module, batch: dict, device="cpu", autocast=nullcontext,
             loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """Σ ``loss`` (:data:`LOSSES`; cross-entropy by default) over target tokens (float32) and their
    count. The output head runs only at the positions that predict a target (:func:`_logits` with
    ``at``): on chat rows most positions carry no loss, and the head is the widest layer of a small
    model (a fifth of SmolLM2-135M's forward FLOPs per token). A :func:`collate_packed` or
    :func:`collate_flat` batch has position ids and no attention mask (and must have no cache: one
    would hide the boundaries between its examples)."""
    labels = batch["labels"].to(device)
    targets = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    out = logits(model, batch, device, autocast, at=F.pad(targets, (0, 1)))
    return LOSSES[loss](out.float(), labels[:, 1:][targets]), targets.sum()


def logits(model, batch, device, autocast, at: torch.Tensor | None = None) -> torch.Tensor:
    """The logits ``[rows, width, vocab]``, or with a mask ``at [rows, width]`` those of its positions
    only, ``[n, vocab]`` in row-major order: the decoder's last hidden states are gathered there
    before the output head (a hook on its input), so whatever the model applies after the head
    (a final soft-cap, a logit scale) applies unchanged. A model without ``get_output_embeddings``
    computes every position's logits and the positions are picked from them."""
    keys = ("input_ids", "attention_mask", "position_ids", *VARLEN_KEYS)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in keys}
    head = model.get_output_embeddings() if at is not None and hasattr(model, "get_output_embeddings") else None
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][at], *args[1:])) if head is not None else None
    try:
        with autocast():
            out = model(**inputs, use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    return out[at] if at is not None and head is None else out


@torch.no_grad()
def batching(model, examples, pad_id, device="cpu", autocast=nullcontext) -> Callable[[list[Example]], dict]:
    """The cheapest collate function that gives this model the padded batch's loss: padding-free rows
    (:func:`collate_flat`, where the model's attention reads their boundaries), else several examples
    per row (:func:`collate_packed`, where it keeps them apart by their restarting position ids), else
    :func:`collate`. Each is checked on the data: a long example's second half, laid after its first
    half, must get the logits it gets alone."""
    ids = max((e.input_ids for e in examples[:64]), key=len)
    h = len(ids) // 2
    collate_padded = functools.partial(collate, pad_id=pad_id)
    if h < 2:
        return collate_padded
    rows = [Example(ids, ids), Example(ids[:h], ids[:h]), Example(ids[h:2 * h], ids[h:2 * h])]
    was_training = model.training
    model.eval()
    tol = 1e-4 if autocast is nullcontext else 2e-2
    try:
        alone = logits(model, collate(rows, pad_id), device, autocast)[2, :h].float()
        for make, where in ((collate_flat, lambda x: x[0, len(ids) + h:len(ids) + 2 * h]),
                            (collate_packed, lambda x: x[1, h:2 * h])):
            try:
                got = where(logits(model, make(rows, pad_id), device, autocast)).float()
            except (TypeError, ValueError, RuntimeError):  # e.g. a model without position_ids
                continue
            if (got - alone).abs().max() <= tol * alone.abs().max():
                return functools.partial(make, pad_id=pad_id)
    finally:
        model.train(was_training)
    return collate_padded
