"""Pretrain a tiny Llama on the synthetic world's biographies until it recalls its facts.

    python -m bench.knowledge.pretrain --out svd_serve/data/tiny-knowledge

Writes a Hugging Face model directory (safetensors, float32) with its own byte-level BPE tokenizer,
``knowledge_world.json`` (the world's parameters and the measured recall) and the demo's task
files (``demo_train.jsonl``: questions about the first half of the people, ``demo_test.jsonl``:
the same questions about the other half).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svd_serve.dataset import IGNORE, collate, encode
from svd_serve.files import atomic_dir
from svd_serve.tiny import CHAT_TEMPLATE, SPECIALS

from .world import World, biography, corpus, make_world, qa_rows, recall_rows

MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of completion tokens predicted exactly (greedy, teacher-forced) — for one-token
    completions this is greedy exact match."""
    model.eval()
    pad = tokenizer.pad_token_id
    right = total = 0
    for i in range(0, len(rows), batch_size):
        batch = collate([encode(r, tokenizer, 128) for r in rows[i:i + batch_size]], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = (labels != IGNORE) & (labels != tokenizer.eos_token_id)
        right += int(((logits[:, :-1].argmax(-1) == labels) & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def pretrain(world: World, steps: int = 3000, batch_size: int = 32, lr: float = 3e-3,
             target: float = 0.99, eval_every: int = 250, seed: int = 0, log=print, **model_overrides):
    """Returns (model, tokenizer, recall, steps run). Stops early once recall of every fact reaches ``target``."""
    import transformers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer(corpus(world))
    config = transformers.LlamaConfig(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{**MODEL, **model_overrides})
    model = transformers.LlamaForCausalLM(config)
    probes = recall_rows(world.entities)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / max(warmup, 1)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    recall, t0 = 0.0, time.time()
    for step in range(1, steps + 1):
        model.train()
        people = rng.sample(world.entities, min(batch_size, len(world.entities)))
        batch = collate([encode({"text": biography(e, rng)}, tokenizer, 128) for e in people],
                        tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            recall = accuracy(model, tokenizer, probes)
            log(f"step {step}  loss {loss.item():.4f}  recall {recall:.3f}  {time.time() - t0:.0f}s")
            if recall >= target:
                break
    model.eval()
    return model, tokenizer, recall, step


def save(out: Path, model, tokenizer, world: World, recall: float, info: dict) -> Path:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"seed": world.seed, "n_entities": len(world.entities), "n_new": len(world.new),
                "recall": round(recall, 4), **info}
        (tmp / "knowledge_world.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, people in (("demo_train.jsonl", world.qa_train), ("demo_test.jsonl", world.qa_test)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in qa_rows(people)))
    return out


def load_world(base: str | Path) -> World:
    """The world a base from :func:`save` was pretrained on (regenerated from its seed)."""
    meta = json.loads((Path(base) / "knowledge_world.json").read_text())
    return make_world(meta["n_entities"], meta["n_new"], meta["seed"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, default=300)
    p.add_argument("--new", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = make_world(args.entities, args.new, args.seed)
    t0 = time.time()
    model, tok, recall, steps = pretrain(world, args.steps, args.batch_size, args.lr, args.target, seed=args.seed)
    info = {"steps": steps, "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "minutes": round((time.time() - t0) / 60, 1), "parameters": sum(p.numel() for p in model.parameters())}
    save(Path(args.out), model, tok, world, recall, info)
    print(f"recall {recall:.3f}, {info['parameters']} parameters, {info['minutes']} min -> {args.out}")


if __name__ == "__main__":
    main()
