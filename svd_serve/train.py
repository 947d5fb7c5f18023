"""``svd-serve train``: the adapter training loop, in phases that read top to bottom.

    train(cfg)
      check_config   every bad input is refused before any work (options, files, output directory)
      Processes      one process, or data-parallel ranks under torchrun (distributed.py)
      setup          base → examples → targets → (calibrate) → adapter, fresh or a checkpoint's
                     → AdamW over the adapter only → the run's state (fresh or the checkpoint's)
      fit            per step: lr → one global batch (all accumulation steps, all ranks), loss =
                     Σ masked cross-entropy / target tokens of the whole global batch + the method's
                     regularizer → gradients summed over ranks → clip → step → the method's hook
                     → record, evaluate, checkpoint (checkpoint.py)
      finish         the final adapter at ``out``, the loss plot

A micro-batch's examples are packed into fewer rows of the same width (positions restarting at 0
for each) when a check at the start shows the model keeps them apart; otherwise they are padded.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and any split of a global batch into ranks × accumulation steps ×
micro-batches gives the same update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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
from .calib import input_covariances
from .checkpoint import TrainState
from .data import IGNORE, Example, collate, collate_packed, encode, pack, read_jsonl, split
from .distributed import Processes
from .errors import SvdServeError
from .health import DEFAULT_LIMIT, check_init, parse_limit
from .io import MARKER
from .methods import DEFAULT_METHOD, Options, get_method
from .methods.base import field_kind, parse_value
from .model import absorb_frozen, check_base_dir, load_base, resolve_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # compute dtypes of the base
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Every setting of a run, with its default (the CLI and config files read these defaults)."""

    base: str
    data: str
    out: str
    # adapter
    method: str = DEFAULT_METHOD
    rank: int | None = None  # = options["rank"] (None: the method's default)
    alpha: float | None = None  # = options["alpha"]
    targets: str = "q_proj,v_proj"
    options: dict = field(default_factory=dict)  # the method's options, e.g. {"ratio": 0.2}
    reg: dict = field(default_factory=dict)  # its regularizer weights only, e.g. {"beta": 1e-3}
    calib_data: str | None = None
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
            values = yaml.safe_load(path.read_text()) or {}
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
            kind, optional = field_kind(TrainConfig, key)
            if kind is not None:
                try:
                    values[key] = parse_value(kind, optional, key, value)
                except SvdServeError as e:
                    raise SvdServeError(f"{path}: {e}") from None
    values.update(overrides)
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None  # 0 turns clipping off
    if "max_init_loss_increase" in values:  # a number, or 0 / inf / off (YAML reads off as false)
        values["max_init_loss_increase"] = parse_limit(values["max_init_loss_increase"])
    missing = [k for k in ("base", "data", "out") if not values.get(k)]
    if missing:
        raise SvdServeError(f"missing {', '.join('--' + k for k in missing)} (as flags or in --config)")
    for key in ("options", "reg"):  # ["beta=1e-3"] strings or {"beta": 1e-3} mappings
        values[key] = parse_option_values(values.get("method", DEFAULT_METHOD), values.get(key) or {})
    cfg = TrainConfig(**values)
    method_options(cfg)  # refuse bad method options now
    return cfg


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
def loss_sum(model: nn.Module, batch: dict, device="cpu", autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy over target tokens (float32, at the target positions only) and their count.
    A :func:`collate_packed` batch has position ids and no attention mask (and must have no cache:
    one would hide the boundaries between its examples)."""
    logits = _logits(model, batch, device, autocast)
    labels = batch["labels"][:, 1:].to(device)
    targets = labels != IGNORE
    ce = F.cross_entropy(logits[:, :-1][targets].float(), labels[targets], reduction="sum")
    return ce, targets.sum()


def _logits(model, batch, device, autocast) -> torch.Tensor:
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with autocast():
        return model(**inputs, use_cache=False).logits


@torch.no_grad()
def packing_is_exact(model, examples, pad_id, device="cpu", autocast=nullcontext) -> bool:
    """Whether this model keeps the examples of a :func:`collate_packed` row apart (transformers finds
    them from the restarting position ids): a long example's second half, packed after its first
    half, must get the logits it gets alone."""
    ids = max((e.input_ids for e in examples[:64]), key=len)
    h = len(ids) // 2
    if h < 2:
        return False
    rows = [Example(ids, ids), Example(ids[:h], ids[:h]), Example(ids[h:2 * h], ids[h:2 * h])]
    was_training = model.training
    model.eval()
    try:
        packed = _logits(model, collate_packed(rows, pad_id), device, autocast)[1, h:2 * h].float()
        alone = _logits(model, collate(rows, pad_id), device, autocast)[2, :h].float()
    except (TypeError, ValueError, RuntimeError):  # e.g. a model without position_ids
        return False
    finally:
        model.train(was_training)
    tol = 1e-4 if autocast is nullcontext else 2e-2
    return bool((packed - alone).abs().max() <= tol * alone.abs().max())


# --- the run ---------------------------------------------------------------------------------------
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
    examples: list[Example]
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

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_sum(self.model, batch, self.procs.device, self.autocast)


def train(cfg: TrainConfig) -> Path:
    """Train, write the adapter, records and checkpoints to ``cfg.out``, and return that path."""
    opts = check_config(cfg)
    rows = read_data(cfg)
    procs = Processes.start(cfg.device)
    resume_from = prepare_out(cfg, procs)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    run = setup(cfg, procs, opts, rows, resume_from)
    fit(run)
    finish(run)
    return run.out


def check_config(cfg: TrainConfig) -> Options:
    """Refuse a bad setting with one clear error; returns the method's options."""
    method = get_method(cfg.method)
    check_base_dir(cfg.base)
    if cfg.steps is not None and cfg.epochs is not None:
        raise SvdServeError("give --steps or --epochs, not both")
    if cfg.eval_data and cfg.eval_split:
        raise SvdServeError("give --eval-data or --eval-split, not both")
    opts = method_options(cfg)
    if method.needs_calibration_for(opts) and not cfg.calib_data and not cfg.resume:
        raise SvdServeError(f"method {cfg.method} needs --calib-data" + (
            " with select=activation" if getattr(opts, "select", None) == "activation" else ""))
    if cfg.dtype not in DTYPES:
        raise SvdServeError(f"--dtype must be {' or '.join(DTYPES)}, not {cfg.dtype}")
    if cfg.schedule not in SCHEDULES:
        raise SvdServeError(f"--schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, not {cfg.schedule}")
    for name in ("batch_size", "grad_accum", "max_length", "keep_checkpoints", "steps", "save_every", "eval_every"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise SvdServeError(f"--{name.replace('_', '-')} must be at least 1")
    for name, low, strict in (("lr", 0, True), ("epochs", 0, True), ("warmup", 0, False),
                              ("weight_decay", 0, False), ("max_grad_norm", 0, False)):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise SvdServeError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} "
                                f"{low}, not {value}")
    parse_limit(cfg.max_init_loss_increase)
    return opts


class Rows(NamedTuple):
    train: list[dict]
    eval: list[dict] | None  # --eval-data, or --eval-split of the data
    calib: list[dict] | None  # --calib-data of a fresh run


def read_data(cfg: TrainConfig) -> Rows:
    rows = read_jsonl(cfg.data)
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    if cfg.eval_split:
        rows, eval_rows = split(rows, cfg.eval_split, cfg.seed)
    return Rows(rows, eval_rows, read_jsonl(cfg.calib_data) if cfg.calib_data and not cfg.resume else None)


def prepare_out(cfg: TrainConfig, procs: Processes) -> Path | None:
    """The checkpoint to resume from (``--resume``), or a fresh ``out`` (an earlier run's files removed
    with ``--overwrite``); either way ``out`` is writable."""
    out = Path(cfg.out)
    resume_from = checkpoint.latest(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise SvdServeError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume:
        checkpoint.prepare_out(out, [cfg.base, cfg.data, cfg.eval_data, cfg.calib_data], cfg.overwrite,
                               remove=procs.master)
    if procs.master:
        checkpoint.check_writable(out)
    return resume_from


def setup(cfg: TrainConfig, procs: Processes, opts: Options, rows: Rows, resume_from: Path | None) -> Run:
    """The base, the examples, the adapter attached to the base (fresh, or the checkpoint's), the
    optimizer, and the state to start from."""
    from transformers import AutoTokenizer

    dtype = DTYPES[cfg.dtype]
    model = load_base(cfg.base, dtype)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    examples, evals = encode_examples(cfg, tokenizer, rows, procs.say)
    adapters = (resume_adapter(cfg, model, resume_from) if resume_from is not None
                else new_adapter(cfg, opts, model, tokenizer, rows.calib, progress=cfg.progress and procs.master))
    model.requires_grad_(False)
    adapters.attach(model)  # adapter parameters are the only trainable tensors; frozen ones are buffers
    if cfg.absorb_frozen:
        absorb_frozen(model)
    model.to(procs.device)
    model.config.use_cache = False
    autocast = functools.partial(torch.autocast, procs.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = packing_is_exact(model, examples, pad_id, procs.device, autocast)  # fewer rows, same loss
    make_batch = functools.partial(collate_packed if packed else collate, pad_id=pad_id)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    procs.broadcast_(adapters.state_dict().values())  # every rank starts from rank 0's adapter
    params = [p for p in adapters.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    size = cfg.batch_size * cfg.grad_accum * procs.world  # examples per optimizer step, all ranks together
    state = TrainState(global_batch=size, data=[len(examples), sum(e.n_targets for e in examples)],
                       total_steps=cfg.steps or max(1, round((cfg.epochs or 1) * math.ceil(len(examples) / size))),
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
    health = None if resume_from is not None else check_init(
        model, adapters, evals or examples, pad_id, functools.partial(loss_sum, model, device=procs.device,
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
    return Run(cfg, procs, model, tokenizer, adapters, params, optimizer, examples, evals, make_batch, autocast,
               state, resume_from)


def encode_examples(cfg: TrainConfig, tokenizer, rows: Rows, say: Callable) -> tuple[list[Example], list[Example]]:
    examples = [encode(r, tokenizer, cfg.max_length) for r in rows.train]
    evals = [encode(r, tokenizer, cfg.max_length) for r in rows.eval or []]
    truncated = sum(e.truncated for e in examples) + sum(e.truncated for e in evals)
    if truncated:
        say(f"note: {truncated} of {len(examples) + len(evals)} rows truncated to --max-length {cfg.max_length}")
    if cfg.pack:
        n_rows = len(examples)
        examples = pack(examples, cfg.max_length)
        say(f"packed {n_rows} rows into {len(examples)} rows of at most {cfg.max_length} tokens")
    return examples, evals


def new_adapter(cfg: TrainConfig, opts: Options, model: nn.Module, tokenizer, calib: list[dict] | None,
                progress: bool) -> AdapterSet:
    targets = resolve_targets(model, cfg.targets)
    covs = input_covariances(model, targets, calib, tokenizer, cfg.max_length) if calib else None
    return AdapterSet.create(model, cfg.method, opts, targets, cfg.targets, covs, base_model=str(cfg.base),
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
    bar = tqdm(total=state.total_steps, initial=state.step, desc=f"train {cfg.method}",
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
    ids = global_batch(step, len(run.examples), run.state.global_batch, cfg.seed)
    n_targets = max(1, sum(run.examples[i].n_targets for i in ids))  # of the whole global batch
    ce_sum = torch.zeros((), dtype=torch.float64, device=procs.device)
    reg = None
    for micro in range(cfg.grad_accum):
        first = (micro * procs.world + procs.rank) * cfg.batch_size
        ce, _ = run.loss_sum(run.make_batch([run.examples[i] for i in ids[first:first + cfg.batch_size]]))
        loss = ce / n_targets
        if micro == cfg.grad_accum - 1 and (reg := run.adapters.regularizer()) is not None:
            loss = loss + reg / procs.world  # once per update, over all ranks together
        loss.backward()
        ce_sum += ce.detach().double()
    ce_sum = procs.sum_grads_(run.params, ce_sum)
    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True) if cfg.max_grad_norm
                 else torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    run.optimizer.step()
    run.adapters.after_step(step + 1, run.total_steps)
    run.optimizer.zero_grad(set_to_none=True)
    record = {"loss": ce_sum.item() / n_targets, "lr": lr, "grad_norm": float(grad_norm)}
    if reg is not None:  # at the parameters the loss was taken at
        record["reg"] = reg.item()
    if not math.isfinite(record["loss"]):
        raise SvdServeError(f"the loss is {record['loss']} at step {step + 1}; lower --lr or use float32 "
                            f"(the last checkpoint, if any, is intact)")
    return record, sum(len(run.examples[i].input_ids) for i in ids)


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
