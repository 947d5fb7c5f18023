"""The run: :func:`start` (checks, inputs, processes, :func:`setup`), :func:`fit` (one
:func:`train_step` per optimizer step, records, evaluation, checkpoints) and :func:`finish`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter import AdapterSet
from ..calib import TRAINING_ROWS, calibrate
from ..dataset import Example
from ..errors import SvdServeError
from ..files import MARKER
from ..hub import resolve
from ..methods import Options
from ..model import absorb_frozen, load_base, resolve_targets
from ..weights import Weights
from . import checkpoint
from .attention import sdpa_attention
from .checkpoint import TrainState
from .config import COMPUTE_DTYPES, TrainConfig, check_config
from .distributed import Processes
from .health import Health, check_init
from .inputs import Part, Rows, prepare_out, read_data
from .loss import batching, loss_sum
from .quantized import load_quantized
from .schedule import global_batch, lr_at
from .sharding import absorb_frozen_sharded, load_sharded, whole


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
    source = resolve(cfg.base, cfg.revision)  # a Hub id: its snapshot, the local directory the run reads
    cfg = dataclasses.replace(cfg, base=str(source.path))
    procs = Processes.start(cfg.device)
    rows = read_data(cfg, procs.say)
    resume_from = prepare_out(cfg, procs)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = setup(cfg, procs, opts, rows, resume_from, adapters)
    if adapters is None:  # the adapter records the base as given (a Hub id and the commit it was trained on)
        run.adapters.config.base_model = source.name
        run.adapters.config.base_revision, run.adapters.config.base_commit = source.revision, source.commit
    return run


def setup(cfg: TrainConfig, procs: Processes, opts: Options | None, rows: Rows, resume_from: Path | None,
          adapters: AdapterSet | None = None) -> Run:
    """The base, the examples, the adapter attached to the base (fresh, the checkpoint's, or the given
    ``adapters``, checked against this base), the optimizer, and the state to start from."""
    dtype = COMPUTE_DTYPES[cfg.dtype]
    fresh = adapters is None and resume_from is None
    model = (load_quantized(cfg.base, cfg.quantize, dtype) if cfg.quantize else
             load_sharded(cfg.base, dtype, procs) if cfg.fsdp else load_base(cfg.base, dtype))
    adapters = _adapter_for(cfg, procs, opts, model, rows, resume_from, adapters)
    _prepare_model(cfg, procs, model, adapters, dtype)
    autocast = _autocast(procs.device, dtype)
    pad_id = rows.tokenizer.pad_token_id if rows.tokenizer.pad_token_id is not None else 0
    make_batch = batching(model, rows.parts[0].examples, pad_id, procs.device, autocast)  # no padding, same loss
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    procs.broadcast_(adapters.state_dict().values())  # every rank starts from rank 0's adapter
    params = [p for p in adapters.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    state = _first_state(cfg, procs, rows.parts)
    if resume_from is not None:
        state = _resumed_state(state, optimizer, resume_from, procs)
    # a fresh adapter must keep the base intact (health.py): checked before anything is written
    health = _check_fresh_adapter(cfg, procs, model, adapters, rows, pad_id, autocast) if fresh else None
    if procs.master:
        _start_records(Path(cfg.out), state, health)
    return Run(cfg, procs, model, rows.tokenizer, adapters, params, optimizer, rows.parts, rows.evals, make_batch,
               autocast, state, resume_from)


def _adapter_for(cfg: TrainConfig, procs: Processes, opts: Options | None, model: nn.Module, rows: Rows,
                 resume_from: Path | None, adapters: AdapterSet | None) -> AdapterSet:
    """The given ``adapters`` (checked against this base), the checkpoint's, or a fresh one."""
    base = Weights(cfg.base) if cfg.quantize else whole(model)  # a quantized (sharded) model: against its files
    if adapters is not None:
        adapters.check_base(base)
        return adapters
    if resume_from is not None:
        return resume_adapter(cfg, base, resume_from)
    return new_adapter(cfg, opts, model, rows.tokenizer, rows, progress=cfg.progress and procs.master)


def _prepare_model(cfg: TrainConfig, procs: Processes, model: nn.Module, adapters: AdapterSet,
                   dtype: torch.dtype) -> None:
    """Attach the adapter to the frozen base and move it to the device, with padding-free attention."""
    model.requires_grad_(False)
    adapters.attach(model)  # adapter parameters are the only trainable tensors; frozen ones are buffers
    if cfg.absorb_frozen and not cfg.quantize:  # (a quantized weight cannot absorb them)
        absorb_frozen_sharded(model, procs) if cfg.fsdp else absorb_frozen(model)
    (adapters if cfg.fsdp else model).to(procs.device)  # (a sharded base is on it already)
    # padding-free rows; bfloat16 attention backward is the slower one on CPUs
    sdpa_attention(model, float32=dtype == torch.bfloat16 and procs.device.type == "cpu")
    model.config.use_cache = False


def _autocast(device: torch.device, dtype: torch.dtype) -> Callable:
    """Mixed precision in ``dtype`` where it is not float32."""
    return functools.partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32 else nullcontext


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _first_state(cfg: TrainConfig, procs: Processes, parts: list[Part]) -> TrainState:
    """The state of a new run: its global batch, data sizes and number of steps."""
    size = cfg.batch_size * cfg.grad_accum * procs.world  # examples per optimizer step, all ranks together
    n_first = len(parts[0].examples)  # epochs count the first part
    return TrainState(global_batch=size, data=[x for p in parts for x in (len(p.examples), p.n_targets)],
                      total_steps=cfg.steps or max(1, round((cfg.epochs or 1) * math.ceil(n_first / size))),
                      config=dataclasses.asdict(cfg))


def _resumed_state(state: TrainState, optimizer: torch.optim.Optimizer, resume_from: Path,
                   procs: Processes) -> TrainState:
    """The checkpoint's state (checked to be the same run as ``state``), its optimizer state and RNGs."""
    saved = checkpoint.load_state(resume_from)
    if not saved.same_run(state):
        raise SvdServeError(f"--resume: {resume_from} was trained with a different data file, global batch "
                            "(batch size × grad accum × processes) or number of steps")
    optimizer.load_state_dict(saved.optimizer)
    saved.restore_rng(procs.device)
    procs.say(f"resumed from {resume_from} at step {saved.step}")
    return dataclasses.replace(saved, config=state.config)


def _check_fresh_adapter(cfg: TrainConfig, procs: Processes, model: nn.Module, adapters: AdapterSet, rows: Rows,
                         pad_id: int, autocast: Callable) -> Health:
    """:func:`check_init` on the evaluation rows (else the first part's)."""
    return check_init(model, adapters, rows.evals or rows.parts[0].examples, pad_id,
                      functools.partial(loss_sum, model, device=procs.device, autocast=autocast),
                      cfg.batch_size, cfg.max_init_loss_increase, procs.say, quantized=cfg.quantize)


def _start_records(out: Path, state: TrainState, health: Health | None) -> None:
    """Mark ``out`` as a run's, cut its metrics back to ``state.step`` and record the init check."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    checkpoint.truncate_metrics(out / "metrics.jsonl", state.step)
    if health is not None:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(health.record()) + "\n")


def new_adapter(cfg: TrainConfig, opts: Options, model: nn.Module, tokenizer, rows: Rows,
                progress: bool) -> AdapterSet:
    """A fresh adapter; a method that uses calibration gets its statistic over the calibration rows
    (a Fisher relative to the retain rows' in an unlearning run with --retain-data), or, where it only
    takes one if given (KaSA's default), over the first training rows when there are none."""
    targets = resolve_targets(model, cfg.targets)
    calib_rows = rows.calib or rows.train[:TRAINING_ROWS]

    def calibration(statistic: str):
        return calibrate(statistic, model, targets, calib_rows, tokenizer, cfg.max_length, reference=rows.retain)

    return AdapterSet.fresh(whole(model), cfg.method, opts, targets, cfg.targets, calibration if calib_rows else None,
                            base_model=str(cfg.base), progress=progress,
                            source=Weights(cfg.base) if cfg.quantize else None)  # the init reads W itself


def resume_adapter(cfg: TrainConfig, model: nn.Module | Weights, path: Path) -> AdapterSet:
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
