"""JSONL training data: ``{"text"}``, ``{"prompt", "completion"}`` (loss on the completion only) and
``{"messages": [...]}`` (chat template, loss on assistant turns only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SvdServeError

IGNORE = -100


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SvdServeError(f"data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SvdServeError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not (
                    "text" in row or ("prompt" in row and "completion" in row) or "messages" in row):
                raise SvdServeError(f'{path}:{lineno}: expected {{"text"}}, {{"prompt", "completion"}} '
                                    'or {"messages"}')
            rows.append(row)
    if not rows:
        raise SvdServeError(f"{path} has no rows")
    return rows


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode(row: dict, tokenizer, max_length: int) -> Example:
    """Token ids and labels (``-100`` where no loss is taken), truncated to ``max_length``."""
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


def _encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise SvdServeError("a {\"messages\"} row needs a tokenizer with a chat template; this one has none")
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        if hasattr(full, "input_ids") or isinstance(full, dict):
            full = full["input_ids"]
        full = list(full)
        if full[: len(ids)] != ids:
            raise SvdServeError("the chat template does not render conversations incrementally; "
                                "cannot mask assistant turns")
        new = full[len(ids):]
        if msg.get("role") == "assistant":
            # the assistant header added by add_generation_prompt carries no loss
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False) if i else []
            prefix = list(prefix["input_ids"] if isinstance(prefix, dict) else prefix)
            header = max(0, len(prefix) - len(ids)) if prefix[: len(ids)] == ids else 0
            labels += [IGNORE] * header + new[header:]
        else:
            labels += [IGNORE] * len(new)
        ids = full
    return ids, labels


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
