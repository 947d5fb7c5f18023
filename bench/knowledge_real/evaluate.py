"""Measurements: greedy replies (batched, KV cache), probe retention, fluency NLL, task accuracy, and
the base's reference answers they are compared with (computed once, cached)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from . import adapt
from .probes import Probe, held_aside, split_written, written
from .prompts import FORMAT_TEMPLATES, fluency_prompts, format_prompts
from .tasks import SYSTEM, chat, correct, first_sentence, task_rows, training_rows

FLUENCY_SYSTEM = "You are a helpful assistant."
PROBE_TOKENS = 16  # greedy tokens a probe reply may use (the answer must appear within them)
FLUENCY_TOKENS = 16  # tokens of the base's continuation scored for fluency
TASK_TOKENS = {"inject": 24, "format": 40}
CACHE_VERSION = 2


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix all ``seqs`` share, leaving each at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != seqs[0][i]), n)
    return max(n, 0)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, settled=None,
           batch_size: int = 128) -> list[list[int]]:
    """Greedy decoding with a KV cache: the new token ids of each prompt, up to and including the
    end-of-turn token, or ``max_new_tokens`` of them. The prefix all prompts share (the chat template's
    system turn) is run once; the rest goes in left-padded batches of similar lengths (padding sits
    between the prefix and each prompt's own tokens, masked out, positions counting real tokens only).
    A row also stops as soon as ``settled(i, ids)`` says its outcome cannot change any more; rows that
    stop leave the batch."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    p = common_prefix(prompts)
    shared = model(input_ids=torch.tensor([prompts[0][:p]]), use_cache=True).past_key_values if p else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows) - p
        own = torch.tensor([[0] * (width - len(prompts[i]) + p) + [1] * (len(prompts[i]) - p) for i in rows])
        ids = torch.tensor([[pad] * (width - len(prompts[i]) + p) + prompts[i][p:] for i in rows])
        mask = torch.cat([own.new_ones(len(rows), p), own], dim=1)
        position = p + (own.cumsum(-1) - 1).clamp_min(0)
        cache = None
        if shared is not None:
            cache = copy.deepcopy(shared)
            cache.batch_repeat_interleave(len(rows))
        res = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache, position = res.past_key_values, position[:, -1:] + 1
        for step in range(max_new_tokens):
            tokens = res.logits[:, -1].argmax(-1)
            keep = []
            for j, i in enumerate(rows):
                out[i].append(int(tokens[j]))
                if out[i][-1] != eos and step + 1 < max_new_tokens and not (settled and settled(i, out[i])):
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):
                sel = torch.tensor(keep)
                cache.batch_select_indices(sel)
                rows, tokens, mask, position = [rows[j] for j in keep], tokens[sel], mask[sel], position[sel]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            res = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                        use_cache=True)
            position = position + 1
    return out


def replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, answered=None) -> list[str]:
    """Greedy replies; ``answered(i, text)``, if given, tells when row i's reply already holds its answer
    for good (the row then stops early: its outcome is the same as with the full reply)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    settled = (lambda i, ids: answered(i, decode(ids))) if answered else None
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    return [decode(ids) for ids in greedy(model, tokenizer, prompts, max_new_tokens, settled)]


# --- the base's references ------------------------------------------------------------------------
def cache_key(base: Path, questions: int | None, fluency: int | None) -> str:
    """Changes whenever the written data, the generation settings, the limits or the base model change."""
    candidates, calibration = split_written()
    blob = json.dumps({
        "version": CACHE_VERSION, "probes": [p.__dict__ for p in candidates + calibration],
        "fluency": fluency_prompts(), "format": FORMAT_TEMPLATES, "system": [SYSTEM, FLUENCY_SYSTEM],
        "tokens": [PROBE_TOKENS, FLUENCY_TOKENS], "limits": [questions, fluency],
        "model": [(base / "config.json").read_text(), (base / "model.safetensors").stat().st_size],
    }, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_reference(base: Path, path: Path, questions: int | None = None, fluency: int | None = None,
                   tasks: tuple[str, ...] = (), log=print) -> dict:
    """The base's answers to the written questions (the first ``questions`` of them), the probes it gets
    right, calibration rows, its continuations of the (first ``fluency``) fluency prompts, and, if the
    format task is among ``tasks``, its answers to that task's questions. Read from ``path`` when it
    was made for the same data, limits and model; else computed (and written)."""
    key = cache_key(base, questions, fluency)
    ref = json.loads(path.read_text()) if path.is_file() else {}
    if ref and ref.get("key") != key:
        log(f"{path} was made for other data, limits or another model: recomputing it")
        ref = {}
    model = tokenizer = None
    if not ref:
        model, tokenizer = adapt.load_model(base), adapt.load_tokenizer(base)
        asked = [(i, p) for i, p in enumerate(written())][:questions]
        candidates = [p for i, p in asked if not held_aside(i)]
        calibration = [p for i, p in asked if held_aside(i)]
        answered = replies(model, tokenizer, [chat(p.question) for p in candidates + calibration], PROBE_TOKENS)
        probes = [{**p.__dict__, "answers": list(p.answers), "reply": r, "correct": p.correct(r)}
                  for p, r in zip(candidates, answered)]
        calib_rows = [{"question": p.question, "reply": first_sentence(r)}
                      for p, r in zip(calibration, answered[len(candidates):]) if first_sentence(r)]
        prompts = fluency_prompts()[:fluency]
        conversations = [[{"role": "system", "content": FLUENCY_SYSTEM}, {"role": "user", "content": q}]
                         for q in prompts]
        continuations = greedy(model, tokenizer, [prompt_ids(tokenizer, c) for c in conversations], FLUENCY_TOKENS)
        ref = {"key": key, "probes": probes, "calibration": calib_rows,
               "fluency": [{"prompt": q, "prompt_ids": prompt_ids(tokenizer, c), "continuation_ids": ids}
                           for q, c, ids in zip(prompts, conversations, continuations)]}
    if "format" in tasks and "format_answers" not in ref:
        if model is None:
            model, tokenizer = adapt.load_model(base), adapt.load_tokenizer(base)
        questions_ = [q for split in ("train", "val", "test") for q in format_prompts(split)]
        got = replies(model, tokenizer, [chat(q) for q in questions_], PROBE_TOKENS)
        ref["format_answers"] = {q: first_sentence(r) for q, r in zip(questions_, got)}
    if model is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ref, indent=1) + "\n")
        tmp.replace(path)
    return ref


def kept_probes(ref: dict) -> list[Probe]:
    """The probes the base answers correctly."""
    return [Probe(p["question"], tuple(p["answers"]), p["category"], p["exact_case"]) for p in ref["probes"]
            if p["correct"]]


# --- measurements of a model ----------------------------------------------------------------------
def retention(model, tokenizer, probes: list[Probe]) -> float:
    got = replies(model, tokenizer, [chat(p.question) for p in probes], PROBE_TOKENS,
                  lambda i, text: probes[i].correct(text, partial=True))
    return sum(p.correct(r) for p, r in zip(probes, got)) / len(probes)


def fluency_nll(model, ref: dict) -> float:
    """Mean NLL per token (nats) of the base's own continuations of the fluency prompts."""
    total, count = adapt.nll_sum(model, adapt.continuation_examples(
        [(f["prompt_ids"], f["continuation_ids"]) for f in ref["fluency"]]))
    return total / count


def task_accuracy(model, tokenizer, task: str, rows: list[dict]) -> float:
    answered = (lambda i, text: correct(task, rows[i], text, partial=True)) if task == "inject" else None
    got = replies(model, tokenizer, [chat(r["question"]) for r in rows], TASK_TOKENS[task], answered)
    return sum(correct(task, r, g) for r, g in zip(rows, got)) / len(rows)


def task_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean NLL per target token of the rows' replies (the training loss on these rows)."""
    total, count = adapt.nll_sum(model, adapt.chat_examples(tokenizer, training_rows(rows)))
    return total / count


def rows_of(task: str, split: str, ref: dict) -> list[dict]:
    return task_rows(task, split, ref.get("format_answers", {}))
