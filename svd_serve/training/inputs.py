"""The run's inputs, read and refused before any work: the data rows of every file, tokenized into
the data mode's parts, and the output directory (fresh, cleared with --overwrite, or resumed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..dataset import Example, encode, pack, read_jsonl, split, where
from ..errors import SvdServeError
from ..files import check_writable
from ..model import load_tokenizer
from . import checkpoint
from .config import TrainConfig
from .distributed import Processes


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

