"""What the benchmark scripts share: the model they run on (``--base DIR`` or a locally built toy),
short chat rows for real checkpoints, and a line saying what a run ran on."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

BASE_HELP = ("a Hugging Face causal LM directory to run on (e.g. the one `python scripts/smollm2.py` "
             "prints); default: a small llama built locally with random weights")


def base_model(base: str | None, tmp: Path, **toy) -> tuple[Path, str]:
    """``(path, description)``: ``base`` as given, or a toy llama built with ``toy`` overrides in ``tmp``."""
    from svd_serve.model import check_base_dir
    from svd_serve.tiny import build_tiny_model

    if base:
        path = check_base_dir(base)
        return path, describe(path)
    path = build_tiny_model(tmp / "toy-model", "llama", **toy)
    return path, "toy " + describe(path) + " (built locally, random weights)"


def describe(path: Path) -> str:
    """``name: arch, hidden H, L layers, P parameters``, from the directory's config and weights."""
    from safetensors import safe_open

    cfg = json.loads((Path(path) / "config.json").read_text())
    params = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
    tied = ", tied head" if cfg.get("tie_word_embeddings") else ""
    return (f"{Path(path).name}: {cfg.get('model_type')}, hidden {cfg.get('hidden_size')}, "
            f"{cfg.get('num_hidden_layers')} layers, vocabulary {cfg.get('vocab_size')}{tied}, "
            f"{params / 1e6:.1f}M parameters")


COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
             ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens")]


def chat_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """``n`` short ``{"messages"}`` rows: one user question and a one- or two-sentence answer, no system
    message (a template that has a default one adds it). On SmolLM2-135M-Instruct (whose template
    adds a system prompt) they are 46-68 tokens long (mean 57), of which 9-28 assistant tokens carry
    loss (mean 18)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        country, city = COUNTRIES[i % len(COUNTRIES)]
        kind = i % 3
        if kind == 0:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            q, ans = f"What is the capital of {country}?", f"The capital of {country} is {city}."
        else:
            q, ans = f"Is {a} larger than {b}?", ("Yes" if a > b else "No") + f", {a} is " + (
                "larger" if a > b else "not larger") + f" than {b}."
        if rng.random() < 0.4:
            ans += f" Also, {a} times 2 is {2 * a}."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_line() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def trained_adapter(base: Path, out: Path, method: str = "lora", rank: int = 8, targets: str = "all-linear",
                    steps: int = 8, options: dict | None = None) -> Path:
    """A real adapter of ``base``: ``svd-serve train`` for a few steps on :func:`chat_rows` (no
    random perturbation: the exported tensors are what training made); the rows are also the
    calibration data of methods that take it."""
    from svd_serve.training import TrainConfig, train

    out.parent.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(out.parent / f"{out.name}-rows.jsonl", chat_rows(64))
    train(TrainConfig(base=str(base), data=str(data), out=str(out), method=method, rank=rank, targets=targets,
                      steps=steps, batch_size=8, lr=2e-3, options=options or {}, calib_data=str(data),
                      progress=False))
    return out
