"""Unlearning facts a real model knows: SmolLM2-135M-Instruct, a LoKU adapter (FILA init + inverted hinge
loss) against a plain LoRA trained with the same objective.

The facts are ones the model completes correctly by greedy decoding (checked before training). The
forget set is six capitals; the retain set twelve other facts; the unseen set eighteen facts in
neither set, three of them sharing an answer with a forgotten fact ("The Eiffel Tower is in" Paris).
Reported per set: greedy exact match of the answer and its mean cross-entropy, and the
cross-entropy of some general text in no set.

    python -m bench.unlearn --out /tmp/unlearn [--steps 20 --lr 2e-4 --rank 8 --methods loku,lora]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

FORGET = [("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin"),
          ("The capital of Italy is", " Rome"), ("The capital of Spain is", " Madrid"),
          ("The capital of Japan is", " Tokyo"), ("The capital of Russia is", " Moscow")]
RETAIN = [("The capital of China is", " Beijing"), ("The capital of England is", " London"),
          ("The capital of Canada is", " Ottawa"), ("The capital of Greece is", " Athens"),
          ("The capital of Portugal is", " Lisbon"), ("The capital of Austria is", " Vienna"),
          ("The chemical symbol for gold is", " Au"), ("The chemical symbol for iron is", " Fe"),
          ("The largest planet in the solar system is", " Jupiter"), ("William Shakespeare wrote Romeo and", " Juliet"),
          ("The Mona Lisa was painted by Leonardo da", " Vinci"),
          ("The theory of relativity was developed by Albert", " Einstein")]
UNSEEN = [("The capital of Ireland is", " Dublin"), ("The capital of Norway is", " Oslo"),
          ("The capital of Sweden is", " Stockholm"), ("The capital of Kenya is", " Nairobi"),
          ("The capital of Thailand is", " Bangkok"), ("The chemical symbol for sodium is", " Na"),
          ("The chemical symbol for oxygen is", " O"), ("The first man to walk on the Moon was Neil", " Armstrong"),
          ("The author of Harry Potter is J.K.", " Rowling"), ("The currency of Japan is the", " yen"),
          ("The tallest mountain in the world is Mount", " Everest"), ("The longest river in Africa is the", " Nile"),
          ("The largest ocean on Earth is the", " Pacific"), ("A triangle has three", " sides"),
          ("The Eiffel Tower is in", " Paris"), ("The Statue of Liberty is in New", " York"),
          ("The Colosseum is in", " Rome"), ("The inventor of the telephone was Alexander Graham", " Bell")]
TEXT = [
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "Rain is expected over the weekend, so the picnic has been moved to the community hall.",
    "She poured the tea, sat down by the window and began to read the letter again.",
    "A good recipe for bread needs flour, water, salt, yeast and a little patience.",
    "The train was late because of a signal failure near the central station.",
    "Children learn to count by grouping objects into sets of five and ten.",
    "The museum's new exhibition shows tools that farmers used two hundred years ago.",
    "He fixed the bicycle chain, pumped up the tyres and rode to work along the river.",
]


def rows(facts):
    return [{"prompt": p, "completion": c} for p, c in facts]


@torch.no_grad()
def greedy_hits(model, tokenizer, facts) -> float:
    """Share of facts whose answer tokens greedy decoding reproduces from the prompt."""
    hits = 0
    for prompt, answer in facts:
        ids = tokenizer(prompt)["input_ids"]
        want = tokenizer(answer, add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in want:
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        hits += new == want
    return hits / len(facts)


@torch.no_grad()
def mean_ce(model, tokenizer, data: list[dict], skip_eos: bool = True) -> float:
    from svd_serve.dataset import IGNORE, collate, encode
    from svd_serve.training import loss_sum

    batch = collate([encode(r, tokenizer, 128) for r in data], tokenizer.pad_token_id)
    if skip_eos:
        batch["labels"][batch["labels"] == tokenizer.eos_token_id] = IGNORE
    total, count = loss_sum(model, batch)
    return float(total / count)


def measure(model, tokenizer) -> dict:
    out = {}
    for name, facts in (("forget", FORGET), ("retain", RETAIN), ("unseen", UNSEEN)):
        out[f"{name}_em"] = greedy_hits(model, tokenizer, facts)
        out[f"{name}_ce"] = mean_ce(model, tokenizer, rows(facts))
    out["text_ce"] = mean_ce(model, tokenizer, [{"text": t} for t in TEXT])
    return out


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from svd_serve.adapter import AdapterSet
    from svd_serve.model import load_base
    from svd_serve.realmodel import smollm2
    from svd_serve.training import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--methods", default="loku,lora")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = smollm2()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, facts in (("forget", FORGET), ("retain", RETAIN)):
        files[name] = args.out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows(facts)))
    tokenizer = AutoTokenizer.from_pretrained(base)
    results = {"base": measure(load_base(base), tokenizer)}
    print("base", json.dumps(results["base"]), flush=True)
    for method in args.methods.split(","):
        out = train(TrainConfig(base=str(base), out=str(args.out / method), forget_data=str(files["forget"]),
                                retain_data=str(files["retain"]), method=method, rank=args.rank, targets=args.targets,
                                steps=args.steps, lr=args.lr, batch_size=6, overwrite=True, progress=False))
        model = load_base(base)
        AdapterSet.load(out, model).attach(model)
        results[method] = measure(model, tokenizer)
        print(method, json.dumps(results[method]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
