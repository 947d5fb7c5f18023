"""Every call this benchmark makes into the svd-serve library, in one place (the training API is
still moving; follow it here and nowhere else).

Adapters are trained by :func:`svd_serve.training.train` and evaluated folded into a fresh copy of the
base. A run starts from a copy of a kept initial adapter set where an earlier run made the same one
(:func:`initial_adapters`): the sweep's lrs, the seeds of a deterministic init and both tasks share
one calibration pass and one set of decompositions, and train bit for bit as with a fresh set.
Full fine-tuning is not in the library; :func:`full_finetune` is plain AdamW over every parameter
with the library's data pipeline, batch order, learning-rate schedule, loss and gradient clipping, so
that it differs from the adapter runs in what is trained and nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from svd_serve.adapter import AdapterSet, make_options, parse_option_values
from svd_serve.dataset import IGNORE, Example, collate, encode, read_jsonl
from svd_serve.errors import SvdServeError
from svd_serve.methods import get_method
from svd_serve.model import load_base
from svd_serve.realmodel import smollm2
from svd_serve.training import (
    Rows,
    TrainConfig,
    global_batch,
    loss_sum,
    lr_at,
    method_options,
    new_adapter,
    train,
)

FULL = "full"  # full fine-tuning: every parameter, no adapter
MAX_LENGTH = 256
Error = SvdServeError


def default_base(fetch: bool = True) -> Path:
    return smollm2(fetch=fetch)


def load_model(path: str | Path):
    return load_base(path)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def rank_of(method: str, rank: int) -> int | None:
    """``rank`` for a method with a rank option; None for a full-rank one (osft), which has none."""
    return rank if "rank" in {f.name for f in dataclasses.fields(get_method(method).Options)} else None


def unavailable(method: str, options: tuple[str, ...], rank: int) -> str | None:
    """Why the library cannot train ``method`` with ``options`` (None: it can)."""
    if method == FULL:
        return None
    try:
        make_options(method, rank_of(method, rank), **parse_option_values(method, list(options)))
    except SvdServeError as e:
        return str(e)
    return None


def _probe_data() -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """A fixed random generator, a random 24x40 weight and a calibration covariance for probing layers."""
    gen = torch.Generator().manual_seed(0)
    weight, inputs = torch.randn(24, 40, generator=gen), torch.randn(64, 40, generator=gen)
    return gen, weight, (inputs.T @ inputs / 64).double()


def _probe_layer(method: str, opts, weight: torch.Tensor, cov: torch.Tensor, seed: int = 0):
    """A layer of ``method`` on ``weight``, initialised under torch seed ``seed`` (global RNG untouched)."""
    layer = get_method(method)(*weight.shape, opts)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer.init(weight, cov)
    return layer


def same_adapter(a: tuple[str, tuple[str, ...]], b: tuple[str, tuple[str, ...]], rank: int) -> bool:
    """Whether two (method, options) pairs make the same adapter, hence the same training run: built on
    the same random layer with the same random state, they hold the same parameters and buffers, and
    give the same output and regularizer."""
    if FULL in (a[0], b[0]):
        return a[0] == b[0]
    gen, weight, cov = _probe_data()
    x = torch.randn(5, 40, generator=gen)

    def build(method, options):
        opts = make_options(method, rank_of(method, rank), **parse_option_values(method, list(options)))
        return _probe_layer(method, opts, weight, cov)

    la, lb = build(*a), build(*b)
    if (type(la).needs_calibration != type(lb).needs_calibration
            or type(la).after_step is not type(lb).after_step  # e.g. a rank-adaptive schedule
            or la.state_dict().keys() != lb.state_dict().keys()
            or [n for n, _ in la.named_parameters()] != [n for n, _ in lb.named_parameters()]):
        return False

    def same_now() -> bool:
        sa, sb, ra, rb = la.state_dict(), lb.state_dict(), la.regularizer(), lb.regularizer()
        return (all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(la(x), lb(x))
                and (ra is None) == (rb is None) and (ra is None or torch.equal(ra, rb)))

    with torch.no_grad():
        if not same_now():
            return False
        for (_, pa), (_, pb) in zip(la.named_parameters(), lb.named_parameters()):  # away from the init too
            step = torch.randn(pa.shape, generator=gen)
            pa.add_(step)
            pb.add_(step)
        return same_now()


def needs_calibration(method: str) -> bool:
    return method != FULL and get_method(method).needs_calibration


@dataclass
class Trained:
    path: Path  # an adapter directory, or (full fine-tuning) a model directory
    first_loss: float  # training loss of step 1, taken at the initial weights
    first_rows: list[int]  # the rows of step 1
    final_loss: float  # training loss of the last step
    trainable: int
    seconds: float


def init_uses_rng(method: str, opts) -> bool:
    """Whether the method's init (with options ``opts``) draws random numbers, so that it depends on the
    seed: two inits of the same random layer under different seeds differ."""
    _, weight, cov = _probe_data()
    a, b = (_probe_layer(method, opts, weight, cov, seed).state_dict() for seed in (0, 1))
    return not all(torch.equal(a[k], b[k]) for k in a)


_INITS: dict[tuple, AdapterSet] = {}  # fresh adapter sets by what makes them (see initial_adapters)


def initial_adapters(cfg: TrainConfig) -> AdapterSet:
    """The fresh adapter set ``train(cfg)`` would start from, made as it makes it (the seed set first,
    the calibration statistic over ``cfg.calib_data``) and kept: a run of the same method, options,
    targets, rank and calibration rows (and seed, if the init draws random numbers) gets a copy. The
    calibration pass and the decompositions are most of an all-linear run's training time."""
    opts = method_options(cfg)
    calib = Path(cfg.calib_data).read_bytes() if cfg.calib_data else None
    key = (cfg.base, cfg.method, repr(opts), cfg.targets, calib, cfg.seed if init_uses_rng(cfg.method, opts) else None)
    if key not in _INITS:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.base)
        tokenizer = load_tokenizer(cfg.base)
        calib_rows = read_jsonl(cfg.calib_data) if cfg.calib_data else None
        rows = Rows(train=[], eval=None, calib=calib_rows, retain=None, tokenizer=tokenizer, parts=[], evals=[])
        _INITS[key] = new_adapter(cfg, opts, model, tokenizer, rows, progress=False)
    return copy.deepcopy(_INITS[key])


def train_run(base: Path, method: str, options: tuple[str, ...], targets: str, rank: int, data: Path,
              calib: Path | None, out: Path, steps: int, batch_size: int, lr: float, warmup: float,
              seed: int) -> Trained:
    """Train one adapter (or the full model) on the ``{"messages"}`` rows of ``data``; results in ``out``."""
    t0 = time.perf_counter()
    if method == FULL:
        trainable = full_finetune(base, data, out, steps, batch_size, lr, warmup, seed)
    else:
        cfg = TrainConfig(base=str(base), data=str(data), out=str(out), method=method, rank=rank_of(method, rank),
                          targets=targets, options=parse_option_values(method, list(options)),
                          calib_data=str(calib) if calib is not None else None, max_length=MAX_LENGTH,
                          steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, progress=False,
                          max_init_loss_increase="off")  # init damage is measured here, not refused
        train(cfg, initial_adapters(cfg))
        trainable = sum(p.numel() for p in AdapterSet.load(out).parameters())
    records = [r for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip() and (r := json.loads(line))["step"] > 0]  # (step 0, if any: the init check's)
    n_rows = len(read_jsonl(data))
    return Trained(out, records[0]["loss"], global_batch(0, n_rows, batch_size, seed), records[-1]["loss"],
                   trainable, time.perf_counter() - t0)


def full_finetune(base: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float, warmup: float,
                  seed: int) -> int:
    """AdamW over all parameters, otherwise as :func:`svd_serve.training.train` (no packing: same loss).
    Writes a model directory and ``metrics.jsonl`` to ``out``; returns the number of parameters."""
    cfg = TrainConfig(base=str(base), data=str(data), out=str(out), steps=steps, batch_size=batch_size, lr=lr,
                      warmup=warmup, seed=seed)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    model.requires_grad_(True)
    model.config.use_cache = False
    examples = [encode(r, tokenizer, MAX_LENGTH) for r in read_jsonl(data)]
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    records = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        batch_ids = global_batch(step, len(examples), batch_size, seed)
        batch = collate([examples[i] for i in batch_ids], tokenizer.pad_token_id)
        ce, n = loss_sum(model, batch, torch.device("cpu"), nullcontext)
        (ce / n.clamp_min(1)).backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step + 1, "loss": ce.item() / max(1, n.item())})
        if not math.isfinite(records[-1]["loss"]):
            raise SvdServeError(f"full fine-tuning: the loss is {records[-1]['loss']} at step {step + 1}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return sum(p.numel() for p in params)


def load_trained(base: Path, path: Path):
    """The base with a trained adapter folded in (``W ← W + ΔW``), or a fully fine-tuned model."""
    if (path / "config.json").is_file():
        return load_model(path)
    model = load_model(base)
    AdapterSet.load(path, model).fold_into(model)
    return model


@torch.no_grad()
def nll_sum(model, examples: list[Example], batch_size: int = 32) -> tuple[float, int]:
    """Σ cross-entropy (nats) over the target tokens of ``examples`` and their number (the training
    loss, summed instead of averaged)."""
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i:i + batch_size]], pad_id=0)
        ce, n = loss_sum(model, batch, torch.device("cpu"), nullcontext)
        total += ce.item()
        count += int(n)
    return total, count


def continuation_examples(pairs: list[tuple[list[int], list[int]]]) -> list[Example]:
    """``(prompt ids, continuation ids)`` pairs with the loss on the continuation only."""
    return [Example(p + c, [IGNORE] * len(p) + c) for p, c in pairs]


def chat_examples(tokenizer, rows: list[dict]) -> list[Example]:
    """``{"messages"}`` rows as training encodes them (loss on the assistant turn)."""
    return [encode(r, tokenizer, MAX_LENGTH) for r in rows]
