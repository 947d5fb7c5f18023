"""JSONL training data: ``{"text"}``, ``{"prompt", "completion"}`` (loss on the completion only) and
``{"messages": [...]}`` (chat template, loss on assistant turns only)."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SvdServeError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")  # the roles of a {"messages"} row


class Row(dict):
    """One JSONL row, which knows where it was read (``file:line``)."""

    where: str = "?"


def where(row: dict) -> str:
    """``file:line`` of a row read by :func:`read_jsonl` (``?`` for a row made in code)."""
    return getattr(row, "where", "?")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL data file, each checked; an error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SvdServeError(f"data file not found: {path}")
    rows = []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise SvdServeError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                        f"column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SvdServeError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                problem = _check_row(row)
                if problem:
                    raise SvdServeError(f"{path}:{lineno}: {problem}")
                row = Row(row)
                row.where = f"{path}:{lineno}"
                rows.append(row)
    except OSError as e:
        raise SvdServeError(f"cannot read {path}: {e.strerror or e}") from None
    if not rows:
        raise SvdServeError(f"{path} has no rows")
    return rows


def _check_row(row) -> str | None:
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return '"messages" must be a non-empty list of {"role", "content"} strings'
        for i, m in enumerate(msgs):
            if m["role"] not in ROLES:
                return f'messages[{i}] has role {m["role"]!r}: a role is {", ".join(ROLES[:-1])} or {ROLES[-1]}'
        return None
    if isinstance(row, dict) and "text" in row:
        return None if isinstance(row["text"], str) else '"text" must be a string'
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        ok = isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        return None if ok else '"prompt" and "completion" must be strings'
    return 'expected {"text"}, {"prompt", "completion"} or {"messages"}'


def split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random ``(train, eval)`` split with ``round(fraction · N)`` (at least 1) eval rows."""
    if not 0 < fraction < 1:
        raise SvdServeError(f"--eval-split must be in (0, 1), got {fraction}")
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise SvdServeError(f"--eval-split {fraction} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss (the first position is never a target: nothing precedes it)."""
        return sum(label != IGNORE for label in self.labels[1:])


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode(row: dict, tokenizer, max_length: int) -> Example:
    """Token ids and labels (``-100`` where no loss is taken), truncated to ``max_length``."""
    try:
        return _encode(row, tokenizer, max_length)
    except SvdServeError as e:
        raise SvdServeError(f"{where(row)}: {e}" if hasattr(row, "where") else str(e)) from None


def _encode(row: dict, tokenizer, max_length: int) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in row:
        ids, labels = _encode_chat(row["messages"], tokenizer)
    elif "text" in row:
        ids = _ids(tokenizer, row["text"], True) + eos
        labels = list(ids)
    else:
        prompt = _ids(tokenizer, row["prompt"], True)
        completion = _ids(tokenizer, row["completion"], False) + eos
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=False)
    except TemplateError as e:  # e.g. a template that raises for roles out of order
        raise SvdServeError(f"the chat template refuses this conversation: {e}") from None
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render the conversation one message at a time; each message's new tokens get loss only if it
    is an assistant turn, and never its header (what ``add_generation_prompt`` adds)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SvdServeError('a {"messages"} row needs a tokenizer with a chat template; this one has none')
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        full = _template_ids(tokenizer, messages[: i + 1])
        if full[: len(ids)] != ids:
            raise SvdServeError("the chat template does not render conversations incrementally; "
                                "cannot mask assistant turns")
        new = full[len(ids):]
        if msg["role"] == "assistant":
            prefix = _template_ids(tokenizer, messages[:i], generation_prompt=True) if i else []
            header = len(prefix) - len(ids) if prefix[: len(ids)] == ids and full[: len(prefix)] == prefix else 0
            labels += [IGNORE] * header + new[header:]
        else:
            labels += [IGNORE] * len(new)
        ids = full
    return ids, labels


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate consecutive examples into rows of at most ``max_length`` tokens.

    The first token of every appended example gets no loss (it would be predicted from the previous
    example). Packed examples still attend to the ones before them in the same row, as in
    nanoGPT-style packing; leave ``--pack`` off when that matters."""
    out: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        if ids and len(ids) + len(e.input_ids) > max_length:
            out.append(Example(ids, labels))
            ids, labels = [], []
        labels += ([IGNORE] + e.labels[1:]) if ids else e.labels
        ids += e.input_ids
    if ids:
        out.append(Example(ids, labels))
    return out


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_flat(batch: list[Example], pad_id: int | None = None) -> dict:
    """One row of every example back to back, no padding: positions restart at 0 for each, and the
    boundaries go along as transformers' padding-free keywords (``cu_seq_lens_q/k``,
    ``max_length_q/k``), which the attention of :func:`svd_serve.training.sdpa_attention` reads to keep
    every example attending to itself only. Every layer but the attention runs on the real tokens
    only. An example's first token is no target (it would be predicted from the one before it).
    ``pad_id`` is unused (the signature of :func:`collate`)."""
    lens = [len(e.input_ids) for e in batch]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    return {"input_ids": torch.tensor([[t for e in batch for t in e.input_ids]]),
            "position_ids": torch.tensor([[p for n in lens for p in range(n)]]),
            "labels": torch.tensor([[t for e in batch for t in [IGNORE] + e.labels[1:]]]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens)}


def collate_packed(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Fewer rows than :func:`collate`, no wider: the examples go first-fit, longest first, into rows as
    wide as the longest one, with positions restarting at 0 for each (and for the padding at a row's
    end), and no attention mask: transformers' packed-sequence masks keep every example attending to
    itself only, so the loss is the padded batch's with less compute. An example's first token is no
    target (it would be predicted from the one before it)."""
    width = max(len(e.input_ids) for e in batch)
    rows: list[list[Example]] = []
    used: list[int] = []
    for e in sorted(batch, key=lambda e: -len(e.input_ids)):
        i = next((i for i, u in enumerate(used) if u + len(e.input_ids) <= width), len(rows))
        if i == len(rows):
            rows.append([])
            used.append(0)
        rows[i].append(e)
        used[i] += len(e.input_ids)
    ids, positions, labels = [], [], []
    for row, u in zip(rows, used):
        pad = width - u
        ids.append([t for e in row for t in e.input_ids] + [pad_id] * pad)
        positions.append([p for e in row for p in range(len(e.input_ids))] + list(range(pad)))
        labels.append([t for e in row for t in [IGNORE] + e.labels[1:]] + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions), "labels": torch.tensor(labels)}
