"""Shared fixtures: tiny models built from a config (no hub), small JSONL data, a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# max |Δ logits| accepted when comparing two computations of the same model, by dtype (as vLLM's LoRA tests)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model("llama")`` → path of a tiny random model + tokenizer, built once per session."""
    from svd_serve.tiny import build_tiny_model

    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / "model", arch)
        return cache[arch]

    return get


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Question: what is {a} plus {b}? Answer:", "completion": f" {a + b}"}
            for a in range(8) for b in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", rows)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    from svd_serve.tiny import CORPUS

    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in CORPUS[:16]])


@pytest.fixture
def run_cli():
    """Run ``svd-serve ARGS`` in-process; returns (exit code, stdout+stderr)."""
    from svd_serve.cli import main

    def run(*args: str) -> tuple[int, str]:
        return _invoke(main, [str(a) for a in args])

    return run


def _invoke(main, args):
    import contextlib
    import io

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, buf.getvalue()
