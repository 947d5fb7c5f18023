"""Knowledge retention on a real model: does an adapter learn a task while forgetting less?

    python -m bench.knowledge_real.run --out bench/knowledge_real/results          # the whole matrix
    python -m bench.knowledge_real.run --out R --entries lora,kasa --tasks inject --seeds 0
    python -m bench.knowledge_real.run --out R --report-only                       # table.md + plot.png

Base: SmolLM2-135M-Instruct (``--base`` for another directory). For every method entry of
:data:`ENTRIES`, target set, task and seed: train, fold the adapter into a fresh base, measure

- task accuracy on the task's test split (``tasks.py``),
- retention: the share of the probes the base answers correctly that the adapted model still answers
  correctly (greedy replies, ``probes.py``),
- fluency: mean NLL per token of the base's own continuations of general prompts, minus the base's,
- init damage: the training loss of step 1 (taken at the initial weights) and the base's loss on the
  same rows.

Learning rates: each (entry, targets, task) first trains seed 0 at every lr of its grid (``LRS``) and
keeps the one with the best validation accuracy (then the lowest validation loss); the other seeds run
at that lr. Every finished run is appended to ``results.jsonl``; a repeated command skips what is done.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import adapt
from .evaluate import (base_reference, fluency_nll, kept_probes, retention, rows_of, task_accuracy,
                       task_loss)
from .tasks import TASKS, training_rows

TARGETS = {"qv": "q_proj,v_proj", "all": "all-linear", "full": "every parameter"}
# The lr grid of each target set. 3e-2 diverges for most entries on q,v already; training every linear
# layer moves the function more per step, so its grid sits one step lower.
LRS = {"qv": (3e-3, 1e-2, 3e-2), "all": (1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4)}


@dataclass(frozen=True)
class Entry:
    """One row of the method table: a library method (or ``full``), its options, its target sets."""

    name: str
    method: str
    options: tuple[str, ...] = ()  # KEY=VALUE, as `svd-serve train -o`
    targets: tuple[str, ...] = ("qv", "all")
    calibrate: bool = False  # give it the calibration rows even if the method does not require them


# The method table. An entry whose method or option the library lacks is skipped with its reason.
ENTRIES: tuple[Entry, ...] = (
    Entry("full", adapt.FULL, targets=("full",)),
    Entry("lora", "lora"),
    Entry("pissa", "pissa"),
    Entry("milora", "milora"),
    Entry("kasa", "kasa"),
    Entry("kasa-act", "kasa", ("select=activation",), calibrate=True),
    Entry("corda-kpa", "corda-kpa"),
    Entry("kore", "kore"),
    Entry("soma", "soma"),
    Entry("codyra", "codyra"),
    Entry("sst", "sst"),
    Entry("osft", "osft"),
    Entry("diffora", "diffora"),
)


@dataclass(frozen=True)
class Setup:
    steps: int = 16
    batch_size: int = 8
    rank: int = 8
    warmup: float = 0.1  # a fraction of the steps
    questions: int | None = None  # ask the base only the first N written questions (None: all)
    fluency: int | None = None  # use only the first N fluency prompts (None: all)


@dataclass
class Context:
    base: Path
    out: Path
    setup: Setup
    ref: dict
    tokenizer: object
    results: list[dict] = field(default_factory=list)
    base_losses: dict = field(default_factory=dict)  # (task, rows) -> the base's loss on those training rows
    log: object = print

    @property
    def results_file(self) -> Path:
        return self.out / "results.jsonl"

    def append(self, record: dict) -> None:
        self.results.append(record)
        with self.results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def mine(self, **match) -> list[dict]:
        """Records of this setup and probe set with the given fields."""
        return [r for r in self.results if r.get("setup") == asdict(self.setup) and r.get("key") == self.ref["key"]
                and all(r.get(k) == v for k, v in match.items())]


def data_file(ctx: Context, name: str, rows: list[dict]) -> Path:
    path = ctx.out / "data" / f"{name}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def measure(ctx: Context, model, task: str, full: bool) -> dict:
    """Validation accuracy and loss; with ``full`` also test accuracy, retention and fluency."""
    t0, c0 = time.perf_counter(), time.process_time()
    val = rows_of(task, "val", ctx.ref)
    out = {"val_accuracy": task_accuracy(model, ctx.tokenizer, task, val),
           "val_loss": task_loss(model, ctx.tokenizer, val)}
    if full:
        probes = kept_probes(ctx.ref)
        nll = fluency_nll(model, ctx.ref)
        base_nll = fluency_nll_base(ctx)
        out.update(accuracy=task_accuracy(model, ctx.tokenizer, task, rows_of(task, "test", ctx.ref)),
                   retention=retention(model, ctx.tokenizer, probes), n_probes=len(probes),
                   fluency_nll=nll, fluency_delta=nll - base_nll)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    out["eval_cpu_seconds"] = round(time.process_time() - c0, 1)
    return out


def fluency_nll_base(ctx: Context) -> float:
    return ctx.mine(kind="base")[0]["fluency_nll"]  # (measured before any run)


def base_records(ctx: Context, tasks: list[str]) -> None:
    """The untouched base on each task: the floor of accuracy, the reference of everything else."""
    todo = [t for t in tasks if not ctx.mine(kind="base", task=t)]
    if not todo:
        return
    model = adapt.load_model(ctx.base)
    probes = kept_probes(ctx.ref)
    common = {"retention": retention(model, ctx.tokenizer, probes), "n_probes": len(probes),
              "fluency_nll": fluency_nll(model, ctx.ref), "fluency_delta": 0.0}
    for task in todo:
        val = rows_of(task, "val", ctx.ref)
        ctx.append({"kind": "base", "entry": "base", "targets": "-", "task": task, "seed": 0,
                    "setup": asdict(ctx.setup), "key": ctx.ref["key"],
                    "accuracy": task_accuracy(model, ctx.tokenizer, task, rows_of(task, "test", ctx.ref)),
                    "val_accuracy": task_accuracy(model, ctx.tokenizer, task, val),
                    "val_loss": task_loss(model, ctx.tokenizer, val),
                    "train_loss": task_loss(model, ctx.tokenizer, rows_of(task, "train", ctx.ref)), **common})
        ctx.log(f"base   {task:6s}: accuracy {ctx.results[-1]['accuracy']:.3f}, retention {common['retention']:.3f} "
                f"of {len(probes)} probes")


def best_lr(sweep: list[dict]) -> float:
    """Highest validation accuracy, then lowest validation loss (a failed run has none: the worst)."""
    return min(sweep, key=lambda r: (-r["val_accuracy"], math.inf if r["val_loss"] is None else r["val_loss"]))["lr"]


def train_one(ctx: Context, entry: Entry, tkey: str, task: str, seed: int, lr: float, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    c0 = time.process_time()
    train_rows = rows_of(task, "train", ctx.ref)
    data = data_file(ctx, f"{task}-train", training_rows(train_rows))
    calib = None
    if entry.calibrate or adapt.needs_calibration(entry.method):
        calib = data_file(ctx, "calibration", training_rows(ctx.ref["calibration"]))
    s = ctx.setup
    trained = adapt.train_run(ctx.base, entry.method, entry.options, TARGETS[tkey], s.rank, data, calib, run_dir,
                              s.steps, s.batch_size, lr, s.warmup, seed)
    first = tuple(trained.first_rows)
    if (task, first) not in ctx.base_losses:
        ctx.base_losses[task, first] = task_loss(adapt.load_model(ctx.base), ctx.tokenizer,
                                                 [train_rows[i] for i in first])
    base_loss = ctx.base_losses[task, first]
    return {"init_loss": trained.first_loss, "base_loss": base_loss, "final_loss": trained.final_loss,
            "trainable": trained.trainable, "train_seconds": round(trained.seconds, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1)}


def run_cell(ctx: Context, entry: Entry, tkey: str, task: str, seeds: list[int], lrs: tuple[float, ...]) -> None:
    cell = {"entry": entry.name, "targets": tkey, "task": task}
    head = {**cell, "method": entry.method, "options": list(entry.options), "target_spec": TARGETS[tkey],
            "setup": asdict(ctx.setup), "key": ctx.ref["key"]}
    root = ctx.out / "runs" / f"{entry.name}-{tkey}-{task}"
    name = f"{task:6s} {entry.name:9s} {tkey:4s}"

    # seed 0 at every lr of the grid, judged on the validation split; only the best run's files are kept
    for lr in lrs:
        if ctx.mine(kind="sweep", lr=lr, **cell):
            continue
        run_dir = root / f"lr-{lr:g}"
        try:
            rec = train_one(ctx, entry, tkey, task, 0, lr, run_dir)
        except adapt.Error as e:  # diverged: the worst possible sweep point
            ctx.append({"kind": "sweep", **head, "seed": 0, "lr": lr, "error": str(e), "val_accuracy": 0.0,
                        "val_loss": None})
            ctx.log(f"{name} lr {lr:g}: failed: {e}")
            continue
        rec.update(measure(ctx, adapt.load_trained(ctx.base, run_dir), task, full=False))
        ctx.append({"kind": "sweep", **head, "seed": 0, "lr": lr, **rec})
        ctx.log(f"{name} lr {lr:g}: val accuracy {rec['val_accuracy']:.3f}, val loss {rec['val_loss']:.3f}, "
                f"init loss {rec['base_loss']:.2f} -> {rec['init_loss']:.2f} "
                f"({rec['train_seconds']:.0f} s + {rec['eval_seconds']:.0f} s)")
        best = best_lr(ctx.mine(kind="sweep", **cell))
        for other in root.glob("lr-*"):
            if other.name != f"lr-{best:g}":
                shutil.rmtree(other)
    sweep = {r["lr"]: r for r in ctx.mine(kind="sweep", **cell)}  # every lr tried in this setup
    lr = best_lr(list(sweep.values()))

    for seed in seeds:
        if ctx.mine(kind="final", seed=seed, lr=lr, **cell):
            continue
        run_dir = root / f"lr-{lr:g}"
        if seed == 0 and (run_dir / "metrics.jsonl").is_file():  # the sweep's run: same config
            rec = {k: sweep[lr][k] for k in ("init_loss", "base_loss", "final_loss", "trainable", "train_seconds",
                                             "train_cpu_seconds")}
        else:
            run_dir = root / f"seed-{seed}"
            try:
                rec = train_one(ctx, entry, tkey, task, seed, lr, run_dir)
            except adapt.Error as e:
                ctx.append({"kind": "final", **head, "seed": seed, "lr": lr, "error": str(e)})
                ctx.log(f"{name} seed {seed} lr {lr:g}: failed: {e}")
                continue
        rec.update(measure(ctx, adapt.load_trained(ctx.base, run_dir), task, full=True))
        ctx.append({"kind": "final", **head, "seed": seed, "lr": lr, **rec})
        ctx.log(f"{name} seed {seed} lr {lr:g}: accuracy {rec['accuracy']:.3f}, retention {rec['retention']:.3f}, "
                f"fluency {rec['fluency_delta']:+.3f} ({rec['train_seconds']:.0f} s + {rec['eval_seconds']:.0f} s)")
        shutil.rmtree(run_dir)
    shutil.rmtree(root, ignore_errors=True)
    if root.parent.is_dir() and not any(root.parent.iterdir()):
        root.parent.rmdir()


# --- report ----------------------------------------------------------------------------------------
def _stat(rows: list[dict], key: str, scale: float = 100.0, digits: int = 1) -> str:
    values = [scale * r[key] for r in rows]
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def summary(ctx: Context) -> list[dict]:
    """One line per (task, entry, targets) that has final runs: the final runs at the selected lr."""
    lines = []
    for task in TASKS:
        base = ctx.mine(kind="base", task=task)
        if base:
            lines.append({"task": task, "entry": "base", "targets": "-", "runs": base, "sweep": [], "lr": None,
                          "failed": []})
        for entry in ENTRIES:
            for tkey in entry.targets:
                cell = {"entry": entry.name, "targets": tkey, "task": task}
                sweep = sorted(ctx.mine(kind="sweep", **cell), key=lambda r: r["lr"])
                if not sweep:
                    continue
                lr = best_lr(sweep)
                finals = sorted(ctx.mine(kind="final", lr=lr, **cell), key=lambda r: r["seed"])
                lines.append({**cell, "runs": [r for r in finals if "error" not in r], "sweep": sweep, "lr": lr,
                              "failed": [r for r in finals if "error" in r]})
    return lines


def table(ctx: Context, skipped: dict[str, str]) -> str:
    s = ctx.setup
    out = ["# Knowledge retention on SmolLM2-135M-Instruct", "",
           f"Rank {s.rank}, {s.steps} steps of batch {s.batch_size}, warm-up {s.warmup:g} of the steps, cosine; "
           f"probe set `{ctx.ref['key']}`. Percent, mean ± sample std over the seeds listed.", ""]
    titles = {"inject": "Injecting new facts (accuracy: paraphrased questions about the 12 made-up facts)",
              "format": 'Format `{"answer": ...}` (accuracy: replies in the format, unseen question kinds)'}
    lines = summary(ctx)
    for task in TASKS:
        rows = [l for l in lines if l["task"] == task]
        if not rows:
            continue
        out += [f"## {titles[task]}", "",
                "| method | targets | lr | seeds | accuracy | retention | fluency ΔNLL | init loss: base → init | "
                "sweep: val accuracy by lr |", "|---|---|---|---|---|---|---|---|---|"]
        for l in rows:
            runs = l["runs"]
            if l["entry"] == "base":
                b = runs[0]
                out.append(f"| base | - | - | - | {100 * b['accuracy']:.1f} | {100 * b['retention']:.1f} | 0 | "
                           f"{b['train_loss']:.2f} (all training rows) | |")
                continue
            lrs = [r["lr"] for r in l["sweep"]]
            edge = " (edge)" if len(lrs) > 1 and l["lr"] in (min(lrs), max(lrs)) else ""
            sweep = ", ".join(f"{r['lr']:g}: " + ("failed" if "error" in r else f"{100 * r['val_accuracy']:.0f}")
                              for r in l["sweep"])
            if not runs:
                out.append(f"| {l['entry']} | {l['targets']} | {l['lr']:g}{edge} | - | | | | | {sweep} |")
                continue
            init = (f"{statistics.fmean(r['base_loss'] for r in runs):.2f} → "
                    f"{statistics.fmean(r['init_loss'] for r in runs):.2f}")
            out.append(f"| {l['entry']} | {l['targets']} | {l['lr']:g}{edge} | {','.join(str(r['seed']) for r in runs)} | "
                       f"{_stat(runs, 'accuracy')} | {_stat(runs, 'retention')} | "
                       f"{_stat(runs, 'fluency_delta', 1.0, 3)} | {init} | {sweep} |")
        out.append("")
    n = next((l["runs"][0]["n_probes"] for l in lines if l["runs"] and "n_probes" in l["runs"][0]), None)
    out += ["Retention: share of the base's correctly answered probes"
            + (f" ({n})" if n else "") + " still answered correctly. Fluency ΔNLL: nats per token on the "
            "base's own continuations of the fluency prompts, adapted minus base. Init loss: the training loss "
            "of step 1 (at the initial weights) and the base's loss on the same rows, mean over seeds. "
            "`(edge)`: the selected lr is at the edge of the sweep. targets: qv = q_proj,v_proj, "
            "all = all-linear, full = full fine-tuning."]
    failed = [(l, r) for l in lines for r in l["failed"]]
    if failed:
        out += ["", "Failed runs (left out of the statistics):", ""] + [
            f"- {l['task']} `{l['entry']}` {l['targets']} seed {r['seed']} lr {r['lr']:g}: {r['error']}" for l, r in failed]
    if skipped:
        out += ["", "Not run:", ""] + [f"- `{name}`: {why}" for name, why in skipped.items()]
    return "\n".join(out) + "\n"


def plot(ctx: Context, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [l for l in summary(ctx) if l["runs"]]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6.5 * len(TASKS), 5.5), constrained_layout=True)
    names = [e.name for e in ENTRIES]
    markers = {"qv": "o", "all": "s", "full": "*", "-": "X"}
    for ax, task in zip(axes, TASKS):
        for l in (l for l in lines if l["task"] == task):
            runs = l["runs"]
            x = [100 * r["retention"] for r in runs]
            y = [100 * r["accuracy"] for r in runs]
            color = "black" if l["entry"] == "base" else f"C{names.index(l['entry']) % 10}"
            label = l["entry"] if l["entry"] in ("base", "full") else f"{l['entry']} ({l['targets']})"
            ax.errorbar(statistics.fmean(x), statistics.fmean(y),
                        xerr=statistics.stdev(x) if len(x) > 1 else 0, yerr=statistics.stdev(y) if len(y) > 1 else 0,
                        fmt=markers[l["targets"]], color=color, ms=10 if l["targets"] == "full" else 6, capsize=2,
                        label=label)
            ax.annotate(label, (statistics.fmean(x), statistics.fmean(y)), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_title({"inject": "Injecting new facts", "format": "Reply format (behaviour)"}[task], fontsize=10)
        ax.set_xlabel("retention: probes still answered correctly (%)")
        ax.set_ylabel("task accuracy (%)")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best", ncols=2)
        else:
            ax.text(50, 50, "not run", ha="center", va="center", color="gray")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aliases(rank: int) -> dict[str, str]:
    """Entries that make the same adapter as an earlier entry (same targets, grid and calibration):
    name -> the earlier entry's name."""
    out: dict[str, str] = {}
    for i, e in enumerate(ENTRIES):
        if adapt.unavailable(e.method, e.options, rank):
            continue
        for f in ENTRIES[:i]:
            if (f.name not in out and (f.targets, f.calibrate) == (e.targets, e.calibrate)
                    and not adapt.unavailable(f.method, f.options, rank)
                    and adapt.same_adapter((e.method, e.options), (f.method, f.options), rank)):
                out[e.name] = f.name
                break
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True)
    p.add_argument("--entries", default="all", help=f"comma list of {', '.join(e.name for e in ENTRIES)}, or 'all'")
    p.add_argument("--targets", default="qv,all", help="comma list of qv, all (full fine-tuning always runs)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", help="one lr grid for every entry and target set (default: LRS, per target set)")
    p.add_argument("--steps", type=int, default=Setup.steps)
    p.add_argument("--batch-size", type=int, default=Setup.batch_size)
    p.add_argument("--questions", type=int, help="ask the base only the first N written questions (a quick check)")
    p.add_argument("--fluency", type=int, help="use only the first N fluency prompts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    entries = list(ENTRIES) if args.entries == "all" else [e for e in ENTRIES if e.name in args.entries.split(",")]
    unknown = set(args.entries.split(",")) - {e.name for e in ENTRIES} if args.entries != "all" else set()
    unknown |= set(args.targets.split(",")) - {"qv", "all"}
    unknown |= set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        p.error(f"unknown entries, targets or tasks: {', '.join(sorted(unknown))}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else None
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    try:
        run(args, entries, seeds, lrs)
    except adapt.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args, entries: list[Entry], seeds: list[int], lrs: tuple[float, ...] | None) -> None:
    base = Path(args.base) if args.base else adapt.default_base()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = Setup(steps=args.steps, batch_size=args.batch_size, questions=args.questions, fluency=args.fluency)
    t0 = time.perf_counter()
    tasks = args.tasks.split(",")
    ref = base_reference(base, out / "base.json", setup.questions, setup.fluency, tuple(tasks))
    kept = kept_probes(ref)
    print(f"probe set {ref['key']}: the base answers {len(kept)} of {len(ref['probes'])} written questions "
          f"correctly ({time.perf_counter() - t0:.0f} s)", flush=True)
    ctx = Context(base, out, setup, ref, adapt.load_tokenizer(base), log=lambda m: print(m, flush=True))
    if ctx.results_file.is_file():
        ctx.results = [json.loads(l) for l in ctx.results_file.read_text().splitlines() if l.strip()]
    skipped: dict[str, str] = {}  # entry -> why it is not run
    canonical: dict[str, Entry] = {}  # entry -> the entry that runs for it
    same = aliases(setup.rank)
    for e in ENTRIES:
        why = adapt.unavailable(e.method, e.options, setup.rank)
        if why:
            skipped[e.name] = why
        elif e.name in same:
            skipped[e.name] = (f"the same adapter as `{same[e.name]}` at rank {setup.rank} (checked when the run "
                               f"starts), hence the same runs: see `{same[e.name]}`")
            canonical[e.name] = next(f for f in ENTRIES if f.name == same[e.name])
        else:
            canonical[e.name] = e
    if not args.report_only:
        base_records(ctx, tasks)
        for e in entries:
            if e.name in skipped:
                print(f"{e.name}: not run: {skipped[e.name]}", flush=True)
        todo = list(dict.fromkeys(canonical[e.name] for e in entries if e.name in canonical))
        for task in tasks:
            for entry in todo:
                for tkey in entry.targets:
                    if tkey == "full" or tkey in args.targets.split(","):
                        run_cell(ctx, entry, tkey, task, seeds, lrs or LRS[tkey])
    (out / "table.md").write_text(table(ctx, skipped))
    plot(ctx, out / "plot.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
