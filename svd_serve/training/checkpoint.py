"""A training run's directory, and the checkpoints that make it resumable.

``OUT/`` holds the final adapter (``svd_adapter.json`` + ``.safetensors``), ``metrics.jsonl``,
``loss.png`` and ``checkpoints/step-N/``: each a loadable adapter plus ``trainer_state.pt``, the
:class:`TrainState` (optimizer moments, RNG states, progress, and the run it belongs to). Every
checkpoint is written atomically; the last ``keep`` and the best by eval loss are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterSet
from ..errors import SvdServeError
from ..files import atomic_dir, atomic_write_text, check_out

STATE_NAME = "trainer_state.pt"
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl", "loss.png", "checkpoints", ".final.tmp")


@dataclass
class TrainState:
    """What a checkpoint holds besides the adapter: how far the run is, the optimizer and RNG states
    to continue it exactly, and what identifies the run (a resumed one must match)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens seen, all ranks together
    best: tuple[float, int] | None = None  # (eval loss, step) of the best checkpoint so far
    optimizer: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    # the run: examples per optimizer step (all ranks), [examples, target tokens], steps in all
    global_batch: int = 0
    data: list[int] = field(default_factory=list)
    total_steps: int = 0
    config: dict = field(default_factory=dict)  # the TrainConfig, for the record

    def same_run(self, other: "TrainState") -> bool:
        return (self.global_batch, list(self.data), self.total_steps) == (
            other.global_batch, list(other.data), other.total_steps)

    def capture_rng(self, device: torch.device) -> None:
        self.rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def restore_rng(self, device: torch.device) -> None:
        torch.set_rng_state(self.rng["torch"])
        random.setstate(self.rng["python"])
        if device.type == "cuda" and self.rng["cuda"] is not None:
            torch.cuda.set_rng_state(self.rng["cuda"], device)


def save(out: Path, adapters: AdapterSet, state: TrainState, keep: int) -> Path:
    """``out/checkpoints/step-N/`` (N = ``state.step``): the adapter and the state, written atomically;
    then prune to the last ``keep`` checkpoints and the best one."""
    path = out / "checkpoints" / f"step-{state.step}"
    try:
        with atomic_dir(path) as tmp:
            adapters.save(tmp)  # (itself atomic: it replaces tmp with a directory holding the adapter)
            torch.save({f.name: getattr(state, f.name) for f in fields(state)}, tmp / STATE_NAME)
    except OSError as e:
        raise SvdServeError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                            "the previous checkpoints are intact") from None
    best_step = state.best[1] if state.best else None
    if best_step is not None:
        atomic_write_text(out / "checkpoints" / "best.json",
                          json.dumps({"step": best_step, "eval_loss": state.best[0]}) + "\n")
    for s in sorted(steps(out))[:-keep]:
        if s != best_step:
            shutil.rmtree(out / "checkpoints" / f"step-{s}", ignore_errors=True)
    return path


def load_state(path: Path) -> TrainState:
    saved = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    return TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})


def steps(out: Path) -> list[int]:
    """The steps of the complete checkpoints in ``out``."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [int(p.name[5:]) for p in root.iterdir()
            if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_NAME).is_file()]


def latest(out: Path) -> Path | None:
    found = steps(out)
    return out / "checkpoints" / f"step-{max(found)}" if found else None


# --- the run directory -------------------------------------------------------------------------------
def prepare_out(out: Path, inputs: list, overwrite: bool, remove: bool) -> None:
    """A fresh run needs an empty (or new) ``out``; with ``overwrite`` an earlier run's files there
    are removed first (by the process with ``remove``, and only those: a directory svd-serve did not
    write is refused)."""
    if out.is_dir() and (out / "checkpoints").is_dir() and not overwrite:
        raise SvdServeError(f"{out} already holds checkpoints: pass --resume to continue, --overwrite to "
                            "start over, or another --out")
    check_out(out, inputs, overwrite)
    if overwrite and remove and out.is_dir():
        removed = [p for p in (out / name for name in RUN_FILES) if p.exists()]
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if removed:
            print(f"note: --overwrite removed the earlier run's {', '.join(p.name for p in removed)} in {out}")


def save_final(adapters: AdapterSet, out: Path) -> None:
    """The adapter files at ``out`` itself, beside checkpoints/ and the records (which atomic_dir(out)
    would replace): write to a temporary folder, then move the weights and, last, the config in."""
    tmp = adapters.save(out / ".final.tmp", overwrite=True)
    os.replace(tmp / WEIGHTS_NAME, out / WEIGHTS_NAME)
    os.replace(tmp / CONFIG_NAME, out / CONFIG_NAME)
    shutil.rmtree(tmp)  # (only its marker is left)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in map(json.loads, lines) if "loss" in r]  # (not the init check's record, step 0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
