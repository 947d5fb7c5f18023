"""``svd-serve train``: the adapter training loop, in phases that read top to bottom.

    train(cfg)
      start          everything before the first step, in three phases:
      check_config   every bad input is refused before any work (options, files, output directory)
      Processes      one process, or data-parallel ranks under torchrun (distributed.py)
      read_data      rows → tokens; rows without a single target token are refused or counted
      prepare_out    the output directory (refused, or an earlier run's files removed with --overwrite)
      setup          base → targets → (calibrate) → adapter, fresh, a checkpoint's or given
                     → init health check (a fresh adapter)
                     → AdamW over the adapter only → the run's state (fresh or the checkpoint's)
      fit            per step: lr → one global batch (all accumulation steps, all ranks) of every
                     data part, loss = Σ_parts weight · Σ masked loss / target tokens of the part's
                     whole global batch + the method's regularizer → gradients summed over ranks
                     → clip → step → the method's hook (and a fresh optimizer state for what the
                     hook re-factorised) → record, evaluate, checkpoint (checkpoint.py)
      finish         the final adapter at ``out``, the loss plot

A micro-batch's examples are packed into fewer rows of the same width (positions restarting at 0
for each) when a check at the start shows the model keeps them apart; otherwise they are padded.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and any split of a global batch into ranks × accumulation steps ×
micro-batches gives the same update.

The data mode decides the parts (:class:`Part`) and the loss of each (:data:`LOSSES`): ``--data``
is one part with cross-entropy; unlearning (``--forget-data``) is a forget part with LoKU's inverted
hinge loss and, with ``--retain-data``, a retain part with cross-entropy. Every step takes one global
batch of each part (``--batch-size`` rows per process and accumulation step, each part in its own
seeded order); epochs count the first part.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .adapter import AdapterSet, make_options, parse_option_values
from .calib import calibrate
from .checkpoint import TrainState
from .data import IGNORE, Example, collate, collate_flat, collate_packed, encode, pack, read_jsonl, split, where
from .distributed import Processes, check_device
from .errors import SvdServeError
from .health import DEFAULT_LIMIT, check_init, parse_limit
from .io import MARKER, check_writable
from .methods import DEFAULT_METHOD, Adapter, Options, get_method
from .methods.base import field_kind, parse_value
from .model import VARLEN_KEYS, absorb_frozen, check_base_dir, load_base, load_tokenizer, resolve_targets, sdpa_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # compute dtypes of the base
SCHEDULES = ("cosine", "linear", "constant")
PATH_FIELDS = ("base", "data", "out", "calib_data", "eval_data")


@dataclass
class TrainConfig:
    """Every setting of a run, with its default (the CLI and config files read these defaults)."""

    base: str
    out: str
    data: str | None = None  # JSONL to learn (cross-entropy); or forget_data
    # adapter
    method: str = DEFAULT_METHOD
    rank: int | None = None  # = options["rank"] (None: the method's default)
    alpha: float | None = None  # = options["alpha"]
    targets: str = "q_proj,v_proj"
    options: dict = field(default_factory=dict)  # the method's options, e.g. {"ratio": 0.2}
    reg: dict = field(default_factory=dict)  # its regularizer weights only, e.g. {"beta": 1e-3}
    calib_data: str | None = None
    # unlearning, instead of data: the forget rows' targets are pushed down (inverted hinge loss), the
    # retain rows' kept (cross-entropy); each step one global batch of each, the losses weighted
    forget_data: str | None = None
    retain_data: str | None = None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    # data
    max_length: int = 512
    pack: bool = False
    eval_data: str | None = None
    eval_split: float | None = None
    # optimisation
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4  # per process and accumulation step
    grad_accum: int = 1
    lr: float = 4e-4
    schedule: str = "cosine"  # one of SCHEDULES, after warmup
    warmup: float = 0.0  # steps if >= 1, else a fraction of all steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"  # one of DTYPES (autocast; adapter parameters stay float32)
    gradient_checkpointing: bool = False
    absorb_frozen: bool = True  # fold frozen low-rank terms into this run's private base copy (faster)
    max_init_loss_increase: float | str | None = DEFAULT_LIMIT  # nats (health.py); 0, inf, off: never refuse
    seed: int = 0
    # records and checkpoints
    eval_every: int | None = None  # default: at every checkpoint and at the end
    save_every: int | None = None
    keep_checkpoints: int = 3  # the last few, plus the best by eval loss
    resume: bool = False
    overwrite: bool = False  # replace an earlier svd-serve run at ``out`` (its files only)
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    progress: bool = True


def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML/JSON file, then ``overrides`` (flags given on the command line)."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise SvdServeError(f"config file not found: {path}")
        import yaml  # JSON is YAML

        try:
            values = yaml.safe_load(path.read_bytes()) or {}  # (bytes: a file that is not UTF-8 is a YAMLError)
        except yaml.YAMLError as e:
            raise SvdServeError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise SvdServeError(f"{path}: expected a mapping of option names to values")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SvdServeError(f"{path}: unknown option(s) {', '.join(unknown)}")
        for key, value in values.items():  # YAML reads 1e-4 as a string: parse by the field's type
            try:
                values[key] = config_value(key, value)
            except SvdServeError as e:
                raise SvdServeError(f"{path}: {e}") from None
    values.update(overrides)
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None  # 0 turns clipping off
    if "max_init_loss_increase" in values:  # a number, or 0 / inf / off (YAML reads off as false)
        values["max_init_loss_increase"] = parse_limit(values["max_init_loss_increase"])
    missing = [k for k in ("base", "out") if not values.get(k)]
    if not values.get("data") and not values.get("forget_data"):
        missing.append("data (or --forget-data)")
    if missing:
        raise SvdServeError(f"missing {', '.join('--' + k for k in missing)} (as flags or in --config)")
    for key in ("options", "reg"):  # ["beta=1e-3"] strings or {"beta": 1e-3} mappings
        values[key] = parse_option_values(values.get("method", DEFAULT_METHOD), values.get(key) or {})
    cfg = TrainConfig(**values)
    method_options(cfg)  # refuse bad method options now
    return cfg


def config_value(key: str, value):
    """The value of setting ``key`` parsed by its field's type (a string "1e-4" → 1e-4), or an error
    naming the setting when it has another type (``steps: 1.5``, ``lr: [1, 2]``)."""
    if key == "max_init_loss_increase":  # a number of nats, or 0 / inf / off
        try:
            parse_limit(value)
        except SvdServeError:
            raise SvdServeError(f"option {key} must be a number of nats, 0, inf or off, not {value!r}") from None
        return value
    kind, optional = field_kind(TrainConfig, key)
    if kind is not None:
        value = parse_value(kind, optional, key, value)
    if value is None and (optional or key in ("options", "reg")):
        return value
    if key in ("options", "reg"):
        ok = isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        want = "a mapping of KEY: VALUE or a list of KEY=VALUE strings"
    elif key in PATH_FIELDS:
        ok, want = isinstance(value, (str, os.PathLike)), "a path"
    elif kind is None or kind is str:
        ok, want = isinstance(value, str), "a string"
    else:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    if not ok:
        raise SvdServeError(f"option {key} must be {want}, not {value!r}")
    return value


def method_options(cfg: TrainConfig) -> Options:
    """The method's options from ``options`` (``-o``), ``reg`` (``--reg``: regularizer weights only),
    ``rank`` and ``alpha``; a key given twice is refused."""
    weights = get_method(cfg.method).Options.regularizer_weights()
    for key in cfg.reg:
        if key not in weights:
            has = f"its coefficients: {', '.join(weights)}" if weights else "it has no regularizer"
            raise SvdServeError(f"--reg {key}: not a regularizer coefficient of {cfg.method} ({has})")
    values = dict(cfg.options)
    for flag, given in (("--reg", cfg.reg), ("--rank", {"rank": cfg.rank}), ("--alpha", {"alpha": cfg.alpha})):
        for key, value in given.items():
            if value is None:
                continue
            if key in values:
                raise SvdServeError(f"{key} is given twice (in -o/options and as {flag})")
            values[key] = value
    return make_options(cfg.method, **values)


# --- data order and schedule -----------------------------------------------------------------------
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


# --- the loss --------------------------------------------------------------------------------------
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
    logits = _logits(model, batch, device, autocast, at=F.pad(targets, (0, 1)))
    return LOSSES[loss](logits.float(), labels[:, 1:][targets]), targets.sum()


def _logits(model, batch, device, autocast, at: torch.Tensor | None = None) -> torch.Tensor:
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
            logits = model(**inputs, use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    return logits[at] if at is not None and head is None else logits


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
        alone = _logits(model, collate(rows, pad_id), device, autocast)[2, :h].float()
        for make, where in ((collate_flat, lambda x: x[0, len(ids) + h:len(ids) + 2 * h]),
                            (collate_packed, lambda x: x[1, h:2 * h])):
            try:
                got = where(_logits(model, make(rows, pad_id), device, autocast)).float()
            except (TypeError, ValueError, RuntimeError):  # e.g. a model without position_ids
                continue
            if (got - alone).abs().max() <= tol * alone.abs().max():
                return functools.partial(make, pad_id=pad_id)
    finally:
        model.train(was_training)
    return collate_padded


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class Part:
    """One stream of training examples, the loss taken on its targets (a key of :data:`LOSSES`) and
    its weight in the step's loss."""

    name: str
    examples: list[Example]
    loss: str = "ce"
    weight: float = 1.0

    @property
    def n_targets(self) -> int:
        return sum(e.n_targets for e in self.examples)


@dataclass
class Run:
    """What the phases share: built by :func:`setup`. Only ``state`` (and the adapter) is saved."""

    cfg: TrainConfig
    procs: Processes
    model: nn.Module
    tokenizer: object
    adapters: AdapterSet
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    parts: list[Part]  # the data mode's training data: [--data], or [--forget-data, --retain-data]
    evals: list[Example]
    make_batch: Callable[[list[Example]], dict]
    autocast: Callable
    state: TrainState
    resumed_from: Path | None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def total_steps(self) -> int:
        return self.state.total_steps

    @property
    def examples(self) -> list[Example]:
        """The first part's examples (the only ones outside unlearning): epochs count these."""
        return self.parts[0].examples

    def loss_sum(self, batch: dict, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
        return loss_sum(self.model, batch, self.procs.device, self.autocast, loss)


def train(cfg: TrainConfig, adapters: AdapterSet | None = None) -> Path:
    """Train, write the adapter, records and checkpoints to ``cfg.out``, and return that path.

    ``adapters``: train this adapter set (made for ``cfg.base``, not attached to a model) in place
    instead of a fresh one; its own method and options hold (``cfg.method``, ``rank``, ``alpha``,
    ``options``, ``reg``, ``targets`` and ``calib_data`` are not used), and its class may be one
    outside the method registry (the trainable combination of a merge)."""
    run = start(cfg, adapters)
    fit(run)
    finish(run)
    return run.out


def start(cfg: TrainConfig, adapters: AdapterSet | None = None) -> Run:
    """Everything before the first step (see :func:`train` for ``adapters``): the checks, the data,
    the processes, the output directory, the seeds and :func:`setup`."""
    opts = check_config(cfg, adapters.method if adapters is not None else None)
    procs = Processes.start(cfg.device)
    rows = read_data(cfg, procs.say)
    resume_from = prepare_out(cfg, procs)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return setup(cfg, procs, opts, rows, resume_from, adapters)


def check_config(cfg: TrainConfig, given: type[Adapter] | None = None) -> Options | None:
    """Refuse a bad setting with one clear error; returns the method's options. ``given``: the class
    of a given adapter set (see :func:`train`), which has its own options (None is returned)."""
    for f in dataclasses.fields(cfg):  # a library caller's TrainConfig is parsed and checked as a config file's
        setattr(cfg, f.name, config_value(f.name, getattr(cfg, f.name)))
    if given is not None and cfg.resume:
        raise SvdServeError("--resume continues a run from its own checkpoint, not from a given adapter set")
    method = given or get_method(cfg.method)
    check_base_dir(cfg.base)
    check_device(cfg.device)
    if cfg.steps is not None and cfg.epochs is not None:
        raise SvdServeError("give --steps or --epochs, not both")
    if cfg.eval_data and cfg.eval_split:
        raise SvdServeError("give --eval-data or --eval-split, not both")
    if cfg.data and cfg.forget_data:
        raise SvdServeError("give --data (to learn) or --forget-data (to unlearn), not both")
    if cfg.retain_data and not cfg.forget_data:
        raise SvdServeError("--retain-data goes with --forget-data (unlearning)")
    if cfg.forget_data and cfg.eval_split:
        raise SvdServeError("--eval-split splits --data; to evaluate an unlearning run give --eval-data")
    opts = method_options(cfg) if given is None else None
    if (given is None and method.needs_calibration_for(opts) and not cfg.calib_data and not cfg.forget_data
            and not cfg.resume):
        raise SvdServeError(f"method {cfg.method} needs --calib-data" + (
            " with select=activation" if getattr(opts, "select", None) == "activation" else ""))
    if cfg.dtype not in DTYPES:
        raise SvdServeError(f"--dtype must be {' or '.join(DTYPES)}, not {cfg.dtype}")
    if cfg.schedule not in SCHEDULES:
        raise SvdServeError(f"--schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, not {cfg.schedule}")
    for name, low in (("batch_size", 1), ("grad_accum", 1), ("keep_checkpoints", 1), ("steps", 1),
                      ("save_every", 1), ("eval_every", 1), ("max_length", 2), ("seed", 0)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            why = " (a row's first token is never a target: one token leaves nothing to learn)" if low == 2 else ""
            raise SvdServeError(f"--{name.replace('_', '-')} must be at least {low}, not {value}{why}")
    if cfg.seed >= 2**32:
        raise SvdServeError(f"--seed must be below 2**32, not {cfg.seed}")
    for name, low, strict in (("lr", 0, True), ("epochs", 0, True), ("warmup", 0, False),
                              ("weight_decay", 0, False), ("max_grad_norm", 0, False),
                              ("forget_weight", 0, True), ("retain_weight", 0, False)):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise SvdServeError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} "
                                f"{low}, not {value}")
    parse_limit(cfg.max_init_loss_increase)
    return opts


class Rows(NamedTuple):
    train: list[dict]  # --data, or --forget-data
    eval: list[dict] | None  # --eval-data, or --eval-split of the data
    calib: list[dict] | None  # calibration of a fresh run: --calib-data, else the forget rows
    retain: list[dict] | None  # --retain-data
    tokenizer: object
    parts: list[Part]  # the training rows of each data part, tokenized
    evals: list[Example]  # the evaluation rows, tokenized


def read_data(cfg: TrainConfig, say: Callable = print) -> Rows:
    """The rows of every data file, and the training and evaluation rows tokenized: bad data is
    refused here, before the base is loaded and before anything is written."""
    rows = read_jsonl(cfg.data or cfg.forget_data)
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    if cfg.eval_split:
        rows, eval_rows = split(rows, cfg.eval_split, cfg.seed)
    calib = None if cfg.resume else read_jsonl(cfg.calib_data) if cfg.calib_data else rows if cfg.forget_data else None
    retain = read_jsonl(cfg.retain_data) if cfg.retain_data else None
    tokenizer = load_tokenizer(cfg.base)
    parts, evals = encode_examples(cfg, tokenizer, rows, retain, eval_rows or [], say)
    return Rows(rows, eval_rows, calib, retain, tokenizer, parts, evals)


def prepare_out(cfg: TrainConfig, procs: Processes) -> Path | None:
    """The checkpoint to resume from (``--resume``), or a fresh ``out`` (an earlier run's files removed
    with ``--overwrite``); either way ``out`` is writable."""
    out = Path(cfg.out)
    resume_from = checkpoint.latest(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise SvdServeError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume:
        checkpoint.prepare_out(out, [cfg.base, cfg.data, cfg.forget_data, cfg.retain_data, cfg.eval_data,
                                     cfg.calib_data], cfg.overwrite,
                               remove=procs.master)
    if procs.master:
        check_writable(out)
    return resume_from


def setup(cfg: TrainConfig, procs: Processes, opts: Options | None, rows: Rows, resume_from: Path | None,
          adapters: AdapterSet | None = None) -> Run:
    """The base, the examples, the adapter attached to the base (fresh, the checkpoint's, or the given
    ``adapters``, checked against this base), the optimizer, and the state to start from."""
    dtype = DTYPES[cfg.dtype]
    tokenizer, parts, evals = rows.tokenizer, rows.parts, rows.evals
    model = load_base(cfg.base, dtype)
    given = adapters is not None
    if given:
        adapters.check_base(model)
    elif resume_from is not None:
        adapters = resume_adapter(cfg, model, resume_from)
    else:
        adapters = new_adapter(cfg, opts, model, tokenizer, rows, progress=cfg.progress and procs.master)
    model.requires_grad_(False)
    adapters.attach(model)  # adapter parameters are the only trainable tensors; frozen ones are buffers
    if cfg.absorb_frozen:
        absorb_frozen(model)
    model.to(procs.device)
    # padding-free rows; bfloat16 attention backward is the slower one on CPUs
    sdpa_attention(model, float32=dtype == torch.bfloat16 and procs.device.type == "cpu")
    model.config.use_cache = False
    autocast = functools.partial(torch.autocast, procs.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    make_batch = batching(model, parts[0].examples, pad_id, procs.device, autocast)  # no padding, same loss
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    procs.broadcast_(adapters.state_dict().values())  # every rank starts from rank 0's adapter
    params = [p for p in adapters.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    size = cfg.batch_size * cfg.grad_accum * procs.world  # examples per optimizer step, all ranks together
    n_first = len(parts[0].examples)  # epochs count the first part
    state = TrainState(global_batch=size, data=[x for p in parts for x in (len(p.examples), p.n_targets)],
                       total_steps=cfg.steps or max(1, round((cfg.epochs or 1) * math.ceil(n_first / size))),
                       config=dataclasses.asdict(cfg))
    if resume_from is not None:
        saved = checkpoint.load_state(resume_from)
        if not saved.same_run(state):
            raise SvdServeError(f"--resume: {resume_from} was trained with a different data file, global batch "
                                "(batch size × grad accum × processes) or number of steps")
        optimizer.load_state_dict(saved.optimizer)
        saved.restore_rng(procs.device)
        state = dataclasses.replace(saved, config=state.config)
        procs.say(f"resumed from {resume_from} at step {state.step}")
    # a fresh adapter must keep the base intact (health.py): checked before anything is written
    health = None if resume_from is not None or given else check_init(
        model, adapters, evals or parts[0].examples, pad_id, functools.partial(loss_sum, model, device=procs.device,
                                                                      autocast=autocast),
        cfg.batch_size, cfg.max_init_loss_increase, procs.say)
    if procs.master:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
        checkpoint.truncate_metrics(out / "metrics.jsonl", state.step)
        if health is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(health.record()) + "\n")
    return Run(cfg, procs, model, tokenizer, adapters, params, optimizer, parts, evals, make_batch, autocast,
               state, resume_from)


def encode_examples(cfg: TrainConfig, tokenizer, train_rows: list[dict], retain_rows: list[dict] | None,
                    eval_rows: list[dict], say: Callable) -> tuple[list[Part], list[Example]]:
    """The data mode's parts (the training rows, or the forget and retain rows, each with its loss and
    weight) and the evaluation examples."""
    def enc(rows):
        return [encode(r, tokenizer, cfg.max_length) for r in rows]

    if cfg.forget_data:
        sources = [(Part("forget", enc(train_rows), "ihl", cfg.forget_weight), train_rows)]
        if retain_rows:
            sources.append((Part("retain", enc(retain_rows), "ce", cfg.retain_weight), retain_rows))
    else:
        sources = [(Part("train", enc(train_rows)), train_rows)]
    evals = enc(eval_rows)
    every = [e for p, _ in sources for e in p.examples] + evals
    truncated = sum(e.truncated for e in every)
    if truncated:
        say(f"note: {truncated} of {len(every)} rows truncated to --max-length {cfg.max_length}")
    for part, rows in sources:
        check_targets("training" if part.name == "train" else part.name, rows, part.examples, cfg.max_length, say)
    check_targets("evaluation", eval_rows, evals, cfg.max_length, say)
    parts = [p for p, _ in sources]
    if cfg.pack:
        for p in parts:
            n_rows = len(p.examples)
            p.examples = pack(p.examples, cfg.max_length)
            say(f"packed {n_rows} rows into {len(p.examples)} rows of at most {cfg.max_length} tokens")
    return parts, evals


def check_targets(what: str, rows: list[dict], examples: list[Example], max_length: int, say: Callable) -> None:
    """Refuse rows that hold no target token at all (the run would learn nothing, at loss 0); name the
    rows that hold none when only some of them are empty."""
    empty = [(row, e) for row, e in zip(rows, examples) if e.n_targets == 0]
    if not empty:
        return
    cut = sum(e.truncated for _, e in empty)
    first = where(empty[0][0])
    why = ("a chat without an assistant turn, an empty text or completion"
           + (f", or a row cut by --max-length {max_length} before its first target" if cut else ""))
    if len(empty) == len(examples):
        raise SvdServeError(f"no {what} row has a token to learn from ({why}; first: {first})")
    say(f"warning: {len(empty)} of {len(examples)} {what} rows have no token to learn from and add nothing "
        f"to the loss ({why}; first: {first})")


def new_adapter(cfg: TrainConfig, opts: Options, model: nn.Module, tokenizer, rows: Rows,
                progress: bool) -> AdapterSet:
    """A fresh adapter; a method that needs calibration gets its statistic over the calibration rows
    (a Fisher relative to the retain rows' in an unlearning run with --retain-data)."""
    targets = resolve_targets(model, cfg.targets)
    method = get_method(cfg.method)
    stats = None
    if method.needs_calibration_for(opts) and rows.calib:
        stats = calibrate(method.statistic, model, targets, rows.calib, tokenizer, cfg.max_length,
                          reference=rows.retain)
    return AdapterSet.create(model, cfg.method, opts, targets, cfg.targets, stats, base_model=str(cfg.base),
                             progress=progress)


def resume_adapter(cfg: TrainConfig, model: nn.Module, path: Path) -> AdapterSet:
    adapters = AdapterSet.load(path, model)
    if adapters.config.method != cfg.method:
        raise SvdServeError(f"--resume: the checkpoint trains {adapters.config.method}, not {cfg.method}")
    return adapters


def fit(run: Run) -> None:
    """The loop: one :func:`train_step` per optimizer step, then its record, evaluation and checkpoint."""
    cfg, state, procs = run.cfg, run.state, run.procs
    metrics = run.out / "metrics.jsonl"
    run.model.train()
    start, run_tokens = time.perf_counter(), 0
    bar = tqdm(total=state.total_steps, initial=state.step, desc=f"train {run.adapters.config.method}",
               disable=not (cfg.progress and procs.master), dynamic_ncols=True)
    for step in range(state.step, state.total_steps):
        t0 = time.perf_counter()
        loss, step_tokens = train_step(run, step)
        state.step = done = step + 1
        state.tokens += step_tokens
        run_tokens += step_tokens
        now = time.perf_counter()
        record = {"step": done, **loss, "tokens": state.tokens, "tokens_per_s": step_tokens / (now - t0),
                  "elapsed": now - start}
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{run_tokens / (now - start):.0f}")
        save_now = bool(cfg.save_every) and done % cfg.save_every == 0 and done < state.total_steps
        eval_now = bool(run.evals) and (done == state.total_steps or (
            done % cfg.eval_every == 0 if cfg.eval_every else save_now))
        if eval_now:
            record["eval_loss"] = evaluate(run)
            if save_now and (state.best is None or record["eval_loss"] < state.best[0]):
                state.best = (record["eval_loss"], done)  # the best checkpoint is kept
        if procs.master:
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if save_now:
                state.optimizer = run.optimizer.state_dict()
                state.capture_rng(procs.device)
                checkpoint.save(run.out, run.adapters, state, cfg.keep_checkpoints)
    bar.close()


def train_step(run: Run, step: int) -> tuple[dict, int]:
    """One optimizer step over global batch ``step``: its record (loss, lr, grad norm, regularizer) and
    the number of tokens it read."""
    cfg, procs = run.cfg, run.procs
    lr = lr_at(step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # each part: its global batch (own seeded order) and target tokens (of the whole global batch)
    batches = [global_batch(step, len(p.examples), run.state.global_batch, cfg.seed + k) for k, p in enumerate(run.parts)]
    n_targets = [max(1, sum(p.examples[i].n_targets for i in ids)) for p, ids in zip(run.parts, batches)]
    sums = torch.zeros(len(run.parts), dtype=torch.float64, device=procs.device)
    reg = None
    for micro in range(cfg.grad_accum):
        first = (micro * procs.world + procs.rank) * cfg.batch_size
        for k, (part, ids) in enumerate(zip(run.parts, batches)):
            value, _ = run.loss_sum(run.make_batch([part.examples[i] for i in ids[first:first + cfg.batch_size]]),
                                    part.loss)
            loss = part.weight * value / n_targets[k]
            last = micro == cfg.grad_accum - 1 and k == len(run.parts) - 1
            if last and (reg := run.adapters.regularizer()) is not None:
                loss = loss + reg / procs.world  # once per update, over all ranks together
            loss.backward()
            sums[k] += value.detach().double()
    sums = procs.sum_grads_(run.params, sums)
    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True) if cfg.max_grad_norm
                 else torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    run.optimizer.step()
    run.adapters.after_step(step + 1, run.total_steps)
    for p in run.adapters.pop_stale():  # re-factorised by the hook: the optimizer starts their state afresh
        run.optimizer.state.pop(p, None)
    run.optimizer.zero_grad(set_to_none=True)
    means = [v / n for v, n in zip(sums.tolist(), n_targets)]
    record = {"loss": sum(p.weight * m for p, m in zip(run.parts, means)), "lr": lr, "grad_norm": float(grad_norm)}
    if len(run.parts) > 1:
        record.update({f"{p.name}_loss": m for p, m in zip(run.parts, means)})
    if reg is not None:  # at the parameters the loss was taken at
        record["reg"] = reg.item()
    if not math.isfinite(record["loss"]):
        raise SvdServeError(f"the loss is {record['loss']} at step {step + 1}; lower --lr or use float32 "
                            f"(the last checkpoint, if any, is intact)")
    return record, sum(len(p.examples[i].input_ids) for p, ids in zip(run.parts, batches) for i in ids)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean cross-entropy per target token over the evaluation examples (all ranks together)."""
    bs, procs = run.cfg.batch_size, run.procs
    run.model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=procs.device)
    for i in range(procs.rank * bs, len(run.evals), procs.world * bs):
        stats += torch.stack(run.loss_sum(run.make_batch(run.evals[i:i + bs]))).double()
    procs.sum_(stats)
    run.model.train()
    return (stats[0] / stats[1].clamp_min(1)).item()


def finish(run: Run) -> None:
    """Rank 0 writes the final adapter and the loss plot (every rank must hold rank 0's adapter)."""
    run.procs.check_same(run.adapters.state_dict())
    run.model.eval()
    if run.procs.master:
        checkpoint.save_final(run.adapters, run.out)
        if run.state.best is not None:
            print(f"best checkpoint: step {run.state.best[1]}, eval loss {run.state.best[0]:.4f}")
        checkpoint.plot(run.out / "metrics.jsonl", run.out / "loss.png")
    run.procs.barrier()
