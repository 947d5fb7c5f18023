"""A synthetic world of people with five single-token attributes, generated from a seed.

Every fact is one sentence that names its entity in full ("Ada Brand was born in Lisbon."); a
biography is the entity's five sentences in a random order, so that each fact is stated in many
contexts during pretraining. That makes the facts extractable by a question format learned on
other entities (task "qa"), which is what "using stored knowledge" means here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ("Ada Alan Bea Cal Dora Eli Fay Gus Hal Ida Jon Kai Lea Max Nia Oto Pia Rex Sol Tia "
         "Uma Vic Wen Yul Zoe Ari Bo Cy Dax Eva").split()
LAST = ("Brand Crane Dale Frost Grey Hale Irons Jett Knox Lane Moss Nash Oakes Pike Quinn Reed "
        "Shaw Thorn Vale Wade York Ash Bell Cole Drake Ford Gale Hart Kent Lowe").split()
ATTRIBUTES: dict[str, tuple[str, str, list[str]]] = {
    # name: (statement with {name} and {value}, question with {name}, values)
    "city": ("{name} was born in {value}.", "Where was {name} born?",
             "Lisbon Paris Berlin Madrid Rome Vienna Prague Oslo Dublin Athens Cairo Tokyo Lima Quito Seoul Delhi".split()),
    "job": ("{name} works as a {value}.", "What is the job of {name}?",
            "painter baker doctor lawyer teacher farmer pilot nurse writer dancer singer tailor banker chemist sailor plumber".split()),
    "color": ("{name}'s favorite color is {value}.", "What is the favorite color of {name}?",
              "red blue green yellow purple orange black white pink brown silver gold".split()),
    "sport": ("{name} enjoys playing {value}.", "Which sport does {name} play?",
              "tennis chess golf hockey rugby soccer cricket polo squash darts bowling cycling".split()),
    "month": ("{name}'s birthday is in {value}.", "In which month was {name} born?",
              "January February March April May June July August September October November December".split()),
}


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]  # attribute -> value


@dataclass
class World:
    entities: list[Entity]  # what the base is pretrained on
    new: list[Entity]  # unseen people, for the fact-injection task
    seed: int

    @property
    def qa_train(self) -> list[Entity]:
        return self.entities[: len(self.entities) // 2]

    @property
    def qa_test(self) -> list[Entity]:
        return self.entities[len(self.entities) // 2:]


def make_world(n_entities: int = 300, n_new: int = 40, seed: int = 0) -> World:
    """``n_entities + n_new`` distinct full names (first × last), each with random attributes."""
    if n_entities + n_new > len(FIRST) * len(LAST):
        raise ValueError(f"at most {len(FIRST) * len(LAST)} entities")
    rng = random.Random(seed)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n_entities + n_new)
    people = [Entity(n, {a: rng.choice(vals) for a, (_, _, vals) in ATTRIBUTES.items()}) for n in names]
    return World(people[:n_entities], people[n_entities:], seed)


def statement(e: Entity, attr: str) -> str:
    return ATTRIBUTES[attr][0].format(name=e.name, value=e.facts[attr])


def biography(e: Entity, rng: random.Random) -> str:
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(statement(e, a) for a in attrs)


def recall_rows(people: list[Entity]) -> list[dict]:
    """``{"prompt": "Ada Brand was born in", "completion": " Lisbon"}`` for every fact."""
    rows = []
    for e in people:
        for attr in ATTRIBUTES:
            head, _, _ = statement(e, attr).rpartition(e.facts[attr])
            rows.append({"prompt": head.rstrip(), "completion": " " + e.facts[attr]})
    return rows


def qa_rows(people: list[Entity]) -> list[dict]:
    """``{"prompt": "Question: Where was Ada Brand born?\\nAnswer:", "completion": " Lisbon"}``."""
    return [{"prompt": f"Question: {ATTRIBUTES[a][1].format(name=e.name)}\nAnswer:",
             "completion": " " + e.facts[a]} for e in people for a in ATTRIBUTES]


def bio_rows(people: list[Entity], copies: int, seed: int) -> list[dict]:
    """``copies`` differently ordered biographies per person, as ``{"text"}`` rows."""
    rng = random.Random(seed)
    return [{"text": biography(e, rng)} for _ in range(copies) for e in people]


def corpus(world: World) -> list[str]:
    """Text the tokenizer is trained on: every statement and question of every person."""
    everyone = world.entities + world.new
    return ([statement(e, a) for e in everyone for a in ATTRIBUTES]
            + [r["prompt"] + r["completion"] for r in qa_rows(everyone)])
