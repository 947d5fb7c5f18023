"""``svd-serve train``: a small adapter training loop that reads top to bottom.

load base → choose targets → (calibrate) → init adapter → AdamW over the adapter only →
loss = masked cross-entropy + the method's regularizer → save the native adapter.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapter import AdapterSet, make_options
from .calib import input_covariances
from .data import IGNORE, collate, encode, read_jsonl
from .errors import SvdServeError
from .methods import get_method
from .model import check_base_dir, load_base, resolve_targets


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    method: str = "kasa"
    rank: int | None = None
    alpha: float | None = None
    targets: str = "q_proj,v_proj"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 4e-4
    batch_size: int = 4
    max_length: int = 512
    seed: int = 0
    calib_data: str | None = None
    options: dict = field(default_factory=dict)  # method options, e.g. {"beta": 1e-3}
    progress: bool = True


def train(cfg: TrainConfig) -> Path:
    method_cls = get_method(cfg.method)
    check_base_dir(cfg.base)
    if cfg.steps is not None and cfg.epochs is not None:
        raise SvdServeError("give --steps or --epochs, not both")
    if method_cls.needs_calibration and not cfg.calib_data:
        raise SvdServeError(f"method {cfg.method} needs --calib-data")
    rows = read_jsonl(cfg.data)
    calib_rows = read_jsonl(cfg.calib_data) if cfg.calib_data else None
    opts = make_options(cfg.method, cfg.rank, cfg.alpha, **cfg.options)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # model, tokenizer, data
    from transformers import AutoTokenizer

    model = load_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [encode(r, tokenizer, cfg.max_length) for r in rows]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        print(f"note: {truncated} of {len(examples)} rows were truncated to --max-length {cfg.max_length}")
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.steps or max(1, round((cfg.epochs or 1) * steps_per_epoch))

    # adapter
    targets = resolve_targets(model, cfg.targets)
    covs = input_covariances(model, targets, calib_rows, tokenizer, cfg.max_length) if calib_rows else None
    adapters = AdapterSet.create(model, cfg.method, opts, targets, cfg.targets, covs,
                                 base_model=str(cfg.base), progress=cfg.progress)
    model.requires_grad_(False)
    adapters.attach(model)  # adapter parameters are the only trainable tensors; frozen ones are buffers
    params = list(adapters.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    # loop
    model.train()
    order: list[int] = []
    bar = tqdm(range(total_steps), desc=f"train {cfg.method}", disable=not cfg.progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(examples)).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = collate([examples[i] for i in idx], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                               ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum().clamp_min(1)
        reg = adapters.regularizer()
        total = loss + reg if reg is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")

    model.eval()
    return adapters.save(cfg.out)
