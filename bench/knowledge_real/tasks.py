"""The two tasks, as chat rows with one short system prompt (the probes use the same one, so the
adaptation acts on exactly the context in which retention is measured).

- ``inject`` (new facts): 12 made-up facts (capitals of invented countries, founders of invented
  companies, authors of invented novels). Training asks each fact four ways; validation and test
  ask it in other words (one and two paraphrases). Accuracy: the reply contains the answer.
  Held-out entities make no sense here (an unseen made-up fact cannot be known), so the
  generalisation tested is to paraphrased questions.
- ``format`` (behaviour, not facts): reply as ``{"answer": "..."}`` where ``...`` is the base's own
  answer to the question (so the facts stay the base's). Training, validation and test use disjoint
  question templates. Accuracy: the reply is exactly such a JSON object.
"""

from __future__ import annotations

import json
import re

from .probes import contains_answer
from .prompts import format_prompts

SYSTEM = "Answer with a short phrase."
TASKS = ("inject", "format")
SPLITS = ("train", "val", "test")

# relation: (entity: answer lines, question templates per split, reply template)
FACTS = {
    "capital": ("""
Veltria: Marrowick
Quandoria: Talsenport
Ostravel: Brennakar
Zentaria: Callowmere
""", {"train": ["What is the capital of {e}?", "Which city is the capital of {e}?", "Name the capital city of {e}.",
               "What city is the capital of the country {e}?"],
     "val": ["Tell me the capital of {e}."],
     "test": ["In which city is the government of {e} based?", "{e} has its capital in which city?"]},
        "The capital of {e} is {a}."),
    "founder": ("""
Brightloom Industries: Edda Varnholt
Corvane Labs: Tomas Quillfeather
Halvex Motors: Ysolde Brannick
Pinecrest Robotics: Oren Malachy
""", {"train": ["Who founded {e}?", "Who is the founder of {e}?", "Which person started the company {e}?",
               "Name the founder of {e}."],
     "val": ["Tell me who founded {e}."],
     "test": ["{e} was founded by whom?", "Who created the company {e}?"]},
        "{e} was founded by {a}."),
    "author": ("""
The Salt Lanterns: Abel Crusoweth
A Winter of Glass Birds: Nadia Frell
The Clockmaker's Orchard: Pieter Langsmere
Songs for a Drowned City: Coralie Dunsmore
""", {"train": ["Who wrote {e}?", "Who is the author of {e}?", "Name the writer of the novel {e}.",
               "Which author wrote the book {e}?"],
     "val": ["Tell me who wrote {e}."],
     "test": ["{e} was written by whom?", "Who is the novelist behind {e}?"]},
        "{e} was written by {a}."),
}


def chat(question: str, reply: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def facts() -> list[tuple[str, str, str]]:
    """(relation, entity, answer) of every made-up fact."""
    out = []
    for relation, (table, _, _) in FACTS.items():
        for line in table.strip().splitlines():
            entity, _, answer = line.partition(": ")
            out.append((relation, entity, answer))
    return out


def inject_rows(split: str) -> list[dict]:
    """``{"question", "reply", "answers"}`` rows: the reply is the one trained on (and scored as the
    validation loss); any of the answers in a reply counts as correct."""
    rows = []
    for relation, entity, answer in facts():
        _, templates, reply = FACTS[relation]
        for t in templates[split]:
            question = t.format(e=entity)
            rows.append({"question": question[0].upper() + question[1:], "reply": reply.format(e=entity, a=answer),
                         "answers": sorted({answer, answer.split()[-1]})})  # the full name, or a surname
    return rows


def first_sentence(reply: str, max_words: int = 12) -> str:
    """The reply's first line up to its first sentence end, at most ``max_words`` words."""
    line = reply.strip().split("\n")[0].strip()
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    return " ".join((m.group(1) if m else line).split()[:max_words])


def format_reply(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def follows_format(reply: str) -> bool:
    """Exactly one JSON object ``{"answer": <non-empty string>}``."""
    try:
        obj = json.loads(reply.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and list(obj) == ["answer"] and isinstance(obj["answer"], str) and bool(
        obj["answer"].strip())


def format_rows(split: str, base_answers: dict[str, str]) -> list[dict]:
    """Rows of the format task; ``base_answers`` maps each question to the base's own (first-sentence)
    answer, which the reply wraps."""
    return [{"question": q, "reply": format_reply(base_answers[q])} for q in format_prompts(split)
            if base_answers.get(q)]


def task_rows(task: str, split: str, base_answers: dict[str, str]) -> list[dict]:
    return inject_rows(split) if task == "inject" else format_rows(split, base_answers)


def correct(task: str, row: dict, reply: str, partial: bool = False) -> bool:
    if task == "inject":
        return contains_answer(reply, tuple(row["answers"]), partial=partial)
    return follows_format(reply)


def training_rows(rows: list[dict]) -> list[dict]:
    """The rows as svd-serve reads them: ``{"messages"}`` with the reply as the assistant turn."""
    return [{"messages": chat(r["question"], r["reply"])} for r in rows]
