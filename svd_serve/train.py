"""``svd-serve train``: the adapter training loop, top to bottom.

load base → targets → (calibrate) → init adapter (or resume a checkpoint) → AdamW over the adapter only
→ per step: one global batch (all accumulation steps, all ranks), loss = Σ masked cross-entropy / target
tokens of the whole global batch + the method's regularizer → all-reduce gradients → clip → step
→ log, evaluate, checkpoint → the final adapter at ``out``.

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
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterSet, make_options, parse_option_values
from .calib import input_covariances
from .data import IGNORE, Example, collate, collate_packed, encode, pack, read_jsonl, split
from .errors import SvdServeError
from .health import DEFAULT_LIMIT, check_init, parse_limit
from .io import MARKER, atomic_dir, atomic_write_text, check_out
from .methods import get_method
from .model import check_base_dir, load_base, resolve_targets

REG_FIELDS = ("beta", "gamma", "reg")  # option fields that weight a method's regularizer
STATE_NAME = "trainer_state.pt"
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl", "loss.png", "checkpoints", ".final.tmp")


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    # adapter
    method: str = "kasa"
    rank: int | None = None
    alpha: float | None = None
    targets: str = "q_proj,v_proj"
    options: dict = field(default_factory=dict)  # method options, e.g. {"ratio": 0.2}
    reg: dict = field(default_factory=dict)  # regularizer coefficients, e.g. {"beta": 1e-3}
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
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup: float = 0.0  # steps if >= 1, else a fraction of all steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"  # float32 | bfloat16 (autocast; adapter parameters stay float32)
    gradient_checkpointing: bool = False
    absorb_frozen: bool = True  # fold frozen low-rank terms into this run's private base copy (faster)
    max_init_loss_increase: float | str | None = DEFAULT_LIMIT  # nats; 0, inf, "off", None: never refuse
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
    values.update(overrides)
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None  # 0 turns clipping off
    if "max_init_loss_increase" in values:  # (checked here, before any work)
        values["max_init_loss_increase"] = parse_limit(values["max_init_loss_increase"])
    missing = [k for k in ("base", "data", "out") if not values.get(k)]
    if missing:
        raise SvdServeError(f"missing {', '.join('--' + k for k in missing)} (as flags or in --config)")
    for key in ("options", "reg"):  # "beta=1e-3" strings or {"beta": 1e-3} mappings
        raw = values.get(key) or {}
        if isinstance(raw, dict):
            raw = [f"{k}={v}" for k, v in raw.items()]
        if key == "reg":
            _check_reg(values.get("method", "kasa"), [p.partition("=")[0].strip().replace("-", "_") for p in raw])
        values[key] = parse_option_values(values.get("method", "kasa"), list(raw))
    return TrainConfig(**values)


# --- data order ------------------------------------------------------------------------------------
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


# --- the run ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    method_cls = get_method(cfg.method)
    out = Path(cfg.out)
    _check_config(cfg, method_cls)
    check_base_dir(cfg.base)
    rows = read_jsonl(cfg.data)
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    if cfg.eval_split:
        rows, eval_rows = split(rows, cfg.eval_split, cfg.seed)
    calib_rows = read_jsonl(cfg.calib_data) if cfg.calib_data and not cfg.resume else None
    resume_dir = _latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        raise SvdServeError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume:
        _prepare_out(cfg)

    # processes and devices
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if master:
        _check_writable(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    say = print if master else (lambda *a, **k: None)

    # model, tokenizer, data
    from transformers import AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = load_base(cfg.base, dtype)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [encode(r, tokenizer, cfg.max_length) for r in rows]
    evals = [encode(r, tokenizer, cfg.max_length) for r in eval_rows] if eval_rows else []
    truncated = sum(e.truncated for e in examples) + sum(e.truncated for e in evals)
    if truncated:
        say(f"note: {truncated} of {len(examples) + len(evals)} rows truncated to --max-length {cfg.max_length}")
    if cfg.pack:
        n_rows = len(examples)
        examples = pack(examples, cfg.max_length)
        say(f"packed {n_rows} rows into {len(examples)} rows of at most {cfg.max_length} tokens")
    size = cfg.batch_size * cfg.grad_accum * world  # examples per optimizer step, all ranks together
    total_steps = cfg.steps or max(1, round((cfg.epochs or 1) * math.ceil(len(examples) / size)))
    data_sig = [len(examples), sum(e.n_targets for e in examples)]

    # adapter: fresh, or the checkpoint's
    if resume_dir is not None:
        adapters = AdapterSet.load(resume_dir, model)
        if adapters.config.method != cfg.method:
            raise SvdServeError(f"--resume: the checkpoint trains {adapters.config.method}, not {cfg.method}")
    else:
        targets = resolve_targets(model, cfg.targets)
        covs = input_covariances(model, targets, calib_rows, tokenizer, cfg.max_length) if calib_rows else None
        opts = make_options(cfg.method, cfg.rank, cfg.alpha, **{**cfg.options, **cfg.reg})
        adapters = AdapterSet.create(model, cfg.method, opts, targets, cfg.targets, covs,
                                     base_model=str(cfg.base), progress=cfg.progress and master)
    model.requires_grad_(False)
    adapters.attach(model)  # adapter parameters are the only trainable tensors; frozen ones are buffers
    if cfg.absorb_frozen:
        _absorb_frozen(model, adapters)
    model.to(device)
    model.config.use_cache = False
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32 else nullcontext
    make_batch = functools.partial(collate, pad_id=pad_id)
    if _packing_is_exact(model, examples, pad_id, device, autocast):
        make_batch = functools.partial(collate_packed, pad_id=pad_id)  # fewer rows, same loss
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in adapters.parameters() if p.requires_grad]
    if ddp:  # every rank starts from rank 0's adapter
        for t in adapters.state_dict().values():
            dist.broadcast(t, 0)
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # resume state
    start, best, tokens_seen = 0, None, 0
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_NAME, map_location="cpu", weights_only=False)
        if state["global_batch"] != size or state["data"] != data_sig or state["total_steps"] != total_steps:
            raise SvdServeError(f"--resume: {resume_dir} was trained with a different data file, global batch "
                                "(batch size × grad accum × processes) or number of steps")
        optimizer.load_state_dict(state["optimizer"])
        start, best, tokens_seen = state["step"], state["best"], state["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        say(f"resumed from {resume_dir} at step {start}")
    # a fresh adapter must not break the base (svd_serve.health); checked before anything is written
    health = None if resume_dir is not None else check_init(
        model, adapters, evals or examples, pad_id, lambda batch: _loss_sum(model, batch, device, autocast),
        cfg.batch_size, cfg.max_init_loss_increase, say)
    metrics = out / "metrics.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
        _truncate_metrics(metrics, start)
        if health is not None:
            with metrics.open("a") as f:
                f.write(json.dumps(health.record()) + "\n")

    def evaluate() -> float:
        model.eval()
        stats = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(rank * cfg.batch_size, len(evals), world * cfg.batch_size):
                batch = make_batch(evals[i:i + cfg.batch_size])
                stats += torch.stack(_loss_sum(model, batch, device, autocast)).double()
        if ddp:
            dist.all_reduce(stats)
        model.train()
        return (stats[0] / stats[1].clamp_min(1)).item()

    # the loop
    model.train()
    run_start, run_tokens = time.perf_counter(), 0
    n_targets_of = [e.n_targets for e in examples]
    bar = tqdm(total=total_steps, initial=start, desc=f"train {cfg.method}", disable=not (cfg.progress and master),
               dynamic_ncols=True)
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_ids = global_batch(step, len(examples), size, cfg.seed)
        n_targets = max(1, sum(n_targets_of[i] for i in batch_ids))  # of the whole global batch
        step_tokens = sum(len(examples[i].input_ids) for i in batch_ids)
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)
        reg = None
        for micro in range(cfg.grad_accum):
            first = (micro * world + rank) * cfg.batch_size
            batch = make_batch([examples[i] for i in batch_ids[first:first + cfg.batch_size]])
            ce, _ = _loss_sum(model, batch, device, autocast)
            loss = ce / n_targets
            if micro == cfg.grad_accum - 1 and (reg := adapters.regularizer()) is not None:
                loss = loss + reg / world  # once per update, over all ranks together
            loss.backward()
            ce_sum += ce.detach().double()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if ddp:  # one all-reduce of every adapter gradient and the loss sum
            flat = torch.cat([g.reshape(-1) for g in grads] + [ce_sum.float().reshape(1)])
            dist.all_reduce(flat)
            for g, p, chunk in zip(grads, params, flat[:-1].split([g.numel() for g in grads])):
                p.grad = chunk.view_as(g)
            ce_sum = flat[-1].double()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True) if cfg.max_grad_norm
                     else torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # records
        done = step + 1
        tokens_seen += step_tokens
        run_tokens += step_tokens
        record = {"step": done, "loss": ce_sum.item() / n_targets, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens_seen, "tokens_per_s": step_tokens / (time.perf_counter() - t0),
                  "elapsed": time.perf_counter() - run_start}
        if reg is not None:  # at the parameters the loss was taken at
            record["reg"] = reg.item()
        if not math.isfinite(record["loss"]):
            raise SvdServeError(f"the loss is {record['loss']} at step {done}; lower --lr or use float32 "
                                f"(the last checkpoint, if any, is intact)")
        bar.update(1)
        tok_s = run_tokens / (time.perf_counter() - run_start)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        save_now = bool(cfg.save_every) and done % cfg.save_every == 0 and done < total_steps
        eval_now = bool(evals) and (done == total_steps or (
            done % cfg.eval_every == 0 if cfg.eval_every else save_now))
        if eval_now:
            record["eval_loss"] = evaluate()
            if save_now and (best is None or record["eval_loss"] < best[0]):
                best = (record["eval_loss"], done)  # the best checkpoint is kept
        if master:
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if save_now:
                rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                       "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
                save_checkpoint(out, done, adapters, {
                    "step": done, "optimizer": optimizer.state_dict(), "rng": rng, "best": best,
                    "tokens": tokens_seen, "global_batch": size, "data": data_sig, "total_steps": total_steps,
                    "config": dataclasses.asdict(cfg)}, cfg.keep_checkpoints)
    bar.close()

    # every rank must hold rank 0's adapter; only rank 0 writes
    if ddp:
        for name, t in adapters.state_dict().items():
            ref = t.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, t):
                raise SvdServeError(f"rank {rank} diverged from rank 0 at {name}")
    model.eval()
    if master:
        _save_final(adapters, out)
        if best is not None:
            say(f"best checkpoint: step {best[1]}, eval loss {best[0]:.4f}")
        _plot(metrics, out / "loss.png")
    if ddp:
        dist.barrier()
    return out


class _AbsorbedLinear(torch.nn.Module):
    """``base'(x) + trainable(x)`` where ``base'.weight = W + B_f A_f`` absorbs the adapter's frozen term
    (if it has one); the sum is one ``addmm`` (no separate pass adding the two)."""

    def __init__(self, base: torch.nn.Linear, adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        a, b = self.adapter.trainable_factors()
        y, xa = self.base(x), F.linear(x, a)  # (in bfloat16 runs autocast casts a and b)
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t()).view_as(y)


@torch.no_grad()
def _absorb_frozen(model, adapters: AdapterSet) -> None:
    """Training-time fast path: every adapted layer an :class:`_AbsorbedLinear` (one low-rank product
    fewer where the method has a frozen term, one pass fewer everywhere). It changes only this run's
    own copy of the base weights; the adapter, its frozen buffers and ``delta()`` stay as they are."""
    from .model import AdaptedLinear, add_low_rank_, set_module

    for name, layer in adapters.items():
        frozen = layer.frozen_factors()
        mod = model.get_submodule(name)
        if not isinstance(mod, AdaptedLinear):
            continue
        if frozen is not None:
            add_low_rank_(mod.base.weight, *frozen)
        set_module(model, name, _AbsorbedLinear(mod.base, layer))


def _loss_sum(model, batch, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
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
def _packing_is_exact(model, examples, pad_id, device, autocast) -> bool:
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


# --- checks, checkpoints, records ------------------------------------------------------------------
def _check_config(cfg: TrainConfig, method_cls) -> None:
    if cfg.steps is not None and cfg.epochs is not None:
        raise SvdServeError("give --steps or --epochs, not both")
    if cfg.eval_data and cfg.eval_split:
        raise SvdServeError("give --eval-data or --eval-split, not both")
    if not cfg.calib_data and not cfg.resume and method_cls.needs_calibration_for(
            make_options(cfg.method, cfg.rank, cfg.alpha, **{**cfg.options, **cfg.reg})):
        raise SvdServeError(f"method {cfg.method} needs --calib-data" + (
            " with select=activation" if cfg.options.get("select") == "activation" else ""))
    if cfg.dtype not in ("float32", "bfloat16"):
        raise SvdServeError(f"--dtype must be float32 or bfloat16, not {cfg.dtype}")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise SvdServeError(f"--schedule must be cosine, linear or constant, not {cfg.schedule}")
    for name in ("batch_size", "grad_accum", "max_length", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise SvdServeError(f"--{name.replace('_', '-')} must be at least 1")
    _check_reg(cfg.method, list(cfg.reg))


def _check_reg(method: str, keys: list[str]) -> None:
    fields = {f.name for f in dataclasses.fields(get_method(method).Options)}
    coeffs = [k for k in REG_FIELDS if k in fields]
    for key in keys:
        if key not in coeffs:
            has = f"its coefficients: {', '.join(coeffs)}" if coeffs else "it has no regularizer"
            raise SvdServeError(f"--reg {key}: not a regularizer coefficient of {method} ({has})")


def _prepare_out(cfg: TrainConfig) -> None:
    """A fresh run needs an empty (or new) ``out``; with ``overwrite`` an earlier run's files there
    are removed first (and only those: a directory svd-serve did not write is refused)."""
    out = Path(cfg.out)
    if out.is_dir() and (out / "checkpoints").is_dir() and not cfg.overwrite:
        raise SvdServeError(f"{out} already holds checkpoints: pass --resume to continue, --overwrite to "
                            "start over, or another --out")
    check_out(out, [cfg.base, cfg.data, cfg.eval_data, cfg.calib_data], cfg.overwrite)
    if cfg.overwrite and out.is_dir() and int(os.environ.get("RANK", "0")) == 0:
        removed = [p for p in (out / name for name in RUN_FILES) if p.exists()]
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if removed:
            print(f"note: --overwrite removed the earlier run's {', '.join(p.name for p in removed)} in {out}")


def _check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be created or written (nothing is created here)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SvdServeError(f"cannot create output directory {out}: {existing} is not a directory")
    try:  # a real probe: os.access says yes to root everywhere, /proc and read-only mounts included
        tempfile.TemporaryDirectory(dir=existing, prefix=".svd-serve-probe-").cleanup()
    except OSError as e:
        raise SvdServeError(f"output directory {existing} is not writable ({e.strerror or e})") from None


def save_checkpoint(out: Path, step: int, adapters: AdapterSet, state: dict, keep: int) -> Path:
    """``out/checkpoints/step-N/``: a loadable adapter plus the trainer state, written atomically; then
    prune to the last ``keep`` checkpoints and the best one."""
    path = out / "checkpoints" / f"step-{step}"
    try:
        with atomic_dir(path) as tmp:
            adapters.save(tmp)  # (itself atomic: it replaces tmp with a directory holding the adapter)
            torch.save(state, tmp / STATE_NAME)
    except OSError as e:
        raise SvdServeError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                            "the previous checkpoints are intact") from None
    best_step = state["best"][1] if state["best"] else None
    if best_step is not None:
        atomic_write_text(out / "checkpoints" / "best.json",
                          json.dumps({"step": best_step, "eval_loss": state["best"][0]}) + "\n")
    steps = sorted(_checkpoint_steps(out))
    for s in steps[:-keep]:
        if s != best_step:
            shutil.rmtree(out / "checkpoints" / f"step-{s}", ignore_errors=True)
    return path


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [int(p.name[5:]) for p in root.iterdir()
            if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_NAME).is_file()]


def _latest_checkpoint(out: Path) -> Path | None:
    steps = _checkpoint_steps(out)
    return out / "checkpoints" / f"step-{max(steps)}" if steps else None


def _save_final(adapters: AdapterSet, out: Path) -> None:
    """The adapter files at ``out`` itself, beside checkpoints/ and the records (which atomic_dir(out)
    would replace): write to a temporary folder, then move the weights and, last, the config in."""
    tmp = adapters.save(out / ".final.tmp", overwrite=True)
    os.replace(tmp / WEIGHTS_NAME, out / WEIGHTS_NAME)
    os.replace(tmp / CONFIG_NAME, out / CONFIG_NAME)
    shutil.rmtree(tmp)  # (only its marker is left)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _plot(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for line in metrics.read_text().splitlines() if line.strip() and "loss" in (r := json.loads(line))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
