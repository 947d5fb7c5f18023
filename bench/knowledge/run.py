"""Knowledge-retention benchmark: task accuracy against recall of pretrained facts, per method.

    python -m bench.knowledge.run --out bench/knowledge/results            # every method + full FT, 3 seeds
    python -m bench.knowledge.run --out R --methods kasa,lora --seeds 0    # a subset
    python -m bench.knowledge.run --out R --report-only                    # table + plot from results.jsonl

Tasks, on the base pretrained by ``bench.knowledge.pretrain`` (default: the embedded one):

- ``qa``: questions about the first half of the people, accuracy on the other half (the answers are
  only in the weights, so this measures how well an adapter unlocks stored knowledge);
- ``inject``: biographies of people the base never saw, accuracy = recall of their facts.

Retention = recall of the base's original facts (all people, every attribute) after adaptation.
Accuracy is greedy exact match. Results are appended to ``results.jsonl`` (finished runs are
skipped when the command is repeated), then summarised as ``table.md`` and ``plot.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from svd_serve.adapter import AdapterSet, sweep_options
from svd_serve.dataset import IGNORE, collate, encode
from svd_serve.demo import EMBEDDED, exact_match
from svd_serve.methods import METHODS
from svd_serve.model import load_base, resolve_targets

from .pretrain import load_world
from .world import World, bio_rows, qa_rows, recall_rows

TASKS = ("qa", "inject")
FULL = "full"  # full fine-tuning, the reference
# "delta" is the container for merged / imported / extracted updates (LoRA at scale 1), not a method
TRAINED = [m for m in METHODS if m not in ("delta", "loku")]  # loku unlearns: its init needs a forget set


@dataclass
class Setup:
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3  # adapters
    full_lr: float = 3e-4  # full fine-tuning
    rank: int = 8
    targets: str = "all-linear"
    inject_copies: int = 8  # differently ordered biographies per new person


def task_rows(world: World, task: str, seed: int, setup: Setup) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a task."""
    if task == "qa":
        return qa_rows(world.qa_train), qa_rows(world.qa_test)
    return bio_rows(world.new, setup.inject_copies, seed), recall_rows(world.new)


def calibration_rows(method: str, train: list[dict], world: World, seed: int) -> list[dict]:
    """CorDA-IPA previews the task; CorDA-KPA and KORE protect the knowledge: the original biographies."""
    if method == "corda-ipa":
        return train[:64]
    return bio_rows(random.Random(seed).sample(world.entities, min(64, len(world.entities))), 1, seed)


def run_one(base: Path, world: World, task: str, method: str, seed: int, setup: Setup) -> dict:
    from transformers import AutoTokenizer

    from svd_serve.calib import calibrate

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_base(base)
    train, evaluation = task_rows(world, task, seed, setup)
    model.requires_grad_(method == FULL)
    if method == FULL:
        params, lr, adapters = list(model.parameters()), setup.full_lr, None
    else:
        targets = resolve_targets(model, setup.targets)
        stats = None
        if METHODS[method].needs_calibration:
            stats = calibrate(METHODS[method].statistic, model, targets, calibration_rows(method, train, world, seed),
                              tokenizer)
        adapters = AdapterSet.create(model, method, sweep_options(method, rank=setup.rank), targets,
                                     statistics=stats, progress=False)
        adapters.attach(model)
        params, lr = list(adapters.parameters()), setup.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / setup.steps)))
    examples = [encode(r, tokenizer, 128) for r in train]
    model.train()
    t0 = time.time()
    for _ in range(setup.steps):
        batch = collate(rng.sample(examples, min(setup.batch_size, len(examples))), tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        reg = adapters.regularizer() if adapters is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss + reg if reg is not None else loss).backward()
        optimizer.step()
        sched.step()
    model.eval()
    return {"task": task, "method": method, "seed": seed, "accuracy": exact_match(model, tokenizer, evaluation),
            "retention": exact_match(model, tokenizer, recall_rows(world.entities)),
            "final_loss": round(loss.item(), 4), "train_seconds": round(time.time() - t0, 1),
            "trainable": sum(p.numel() for p in params), **asdict(setup)}


def base_scores(base: Path, world: World, setup: Setup) -> list[dict]:
    """The untouched base on both tasks: the floor for accuracy, the ceiling for retention."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_base(base)
    retention = exact_match(model, tokenizer, recall_rows(world.entities))
    return [{"task": t, "method": "base", "seed": 0, "retention": retention,
             "accuracy": exact_match(model, tokenizer, task_rows(world, t, 0, setup)[1])} for t in TASKS]


def summarise(results: list[dict]) -> dict[tuple[str, str], dict]:
    """(task, method) → seeds, mean and sample std of accuracy and retention over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        stats = {"n": len(rows), "seeds": sorted(r["seed"] for r in rows)}
        for metric in ("accuracy", "retention"):
            values = [r[metric] for r in rows]
            stats[metric] = statistics.fmean(values)
            stats[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = stats
    return out


def order(methods) -> list[str]:
    known = ["base", FULL, *METHODS]
    return sorted(set(methods), key=lambda m: known.index(m) if m in known else len(known))


def command(results: list[dict], out: Path, steps: int) -> str:
    """The one command that reproduces every row (finished runs are skipped when it is repeated)."""
    methods = [m for m in order(r["method"] for r in results) if m != "base"]
    seeds = sorted({r["seed"] for r in results if r["method"] != "base"})
    tasks = [t for t in TASKS if any(r["task"] == t and r["method"] != "base" for r in results)]
    steps = next((r["steps"] for r in results if "steps" in r), steps)
    return (f"python -m bench.knowledge.run --out {out} --methods {','.join(methods)} "
            f"--seeds {','.join(map(str, seeds))} --tasks {','.join(tasks)} --steps {steps}")


def table(summary: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`", "",
             "| method | seeds | QA accuracy (held-out people) | QA retention | inject accuracy (new facts) | inject retention |",
             "|---|---|---|---|---|---|"]

    def fmt(s, m):
        if s is None:
            return "—"
        return f"{100 * s[m]:.1f}" + (f" ± {100 * s[m + '_std']:.1f}" if s["n"] > 1 else "")

    for method in order(m for _, m in summary):
        qa, inj = summary.get(("qa", method)), summary.get(("inject", method))
        per_task = [",".join(map(str, s["seeds"])) for s in (qa, inj) if s is not None]
        seeds = per_task[0] if len(set(per_task)) == 1 else f"qa {per_task[0]}; inject {per_task[1]}"
        lines.append(f"| {method} | {seeds} | {fmt(qa, 'accuracy')} | {fmt(qa, 'retention')} | "
                     f"{fmt(inj, 'accuracy')} | {fmt(inj, 'retention')} |")
    lines += ["", "Percent; mean ± sample standard deviation over the seeds listed (a single seed: its value). "
              "Retention = recall of the base's original facts after adaptation; `base` is the untouched model."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 5), constrained_layout=True)
    titles = {"qa": "QA about held-out people (stored knowledge)", "inject": "Injecting new facts"}
    methods = order(m for _, m in summary)
    for ax, task in zip(axes, TASKS):
        for i, method in enumerate(methods):
            s = summary.get((task, method))
            if s is None:
                continue
            marker = {"base": "s", FULL: "*"}.get(method, "o")
            ax.errorbar(100 * s["retention"], 100 * s["accuracy"], xerr=100 * s["retention_std"],
                        yerr=100 * s["accuracy_std"], fmt=marker, ms=9 if marker == "*" else 6,
                        color=f"C{i % 10}", capsize=2, label=method)
            ax.annotate(method, (100 * s["retention"], 100 * s["accuracy"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_title(titles[task], fontsize=10)
        ax.set_xlabel("retention: recall of original facts (%)")
        ax.set_ylabel("task accuracy (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best", ncols=2)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(EMBEDDED), help="a base written by bench.knowledge.pretrain")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="all", help=f"comma list of {FULL} and registry names, or 'all'")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=Setup.steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    base, setup = Path(args.base), Setup(steps=args.steps)
    world = load_world(base)
    methods = [FULL, *TRAINED] if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m != FULL and m not in METHODS]
    if unknown or not set(args.tasks.split(",")) <= set(TASKS):
        p.error(f"unknown methods or tasks: {unknown or args.tasks}")
    results = [json.loads(l) for l in results_file.read_text().splitlines()] if results_file.is_file() else []
    if not args.report_only:
        if not any(r["method"] == "base" for r in results):
            results += base_scores(base, world, setup)
            results_file.write_text("".join(json.dumps(r) + "\n" for r in results))
        done = {(r["task"], r["method"], r["seed"], r.get("steps")) for r in results}
        for task in args.tasks.split(","):
            for method in methods:
                for seed in map(int, args.seeds.split(",")):
                    if (task, method, seed, setup.steps) in done:
                        continue
                    r = run_one(base, world, task, method, seed, setup)
                    print(f"{task:6s} {method:10s} seed {seed}: accuracy {r['accuracy']:.3f} "
                          f"retention {r['retention']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
                    results.append(r)
                    with results_file.open("a") as f:
                        f.write(json.dumps(r) + "\n")
    summary = summarise(results)
    (out / "table.md").write_text(table(summary, command(results, out, setup.steps)))
    plot(summary, out / "plot.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
