"""Shared fixtures: tiny models built from a config (no hub), small JSONL data, a CLI runner, a trained
adapter, and a base prepared for every method. Helper functions are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import Env, invoke, logits, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def log_in_tmp(tmp_path_factory):
    """Library and engine output goes to a log file of the test session, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVD_SERVE_LOG", str(tmp_path_factory.mktemp("log") / "svd-serve.log"))
        yield


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


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Question: what is {a} plus {b}? Answer:", "completion": f" {a + b}"}
            for a in range(8) for b in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", rows)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    from svd_serve.tiny import CORPUS

    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in CORPUS[:16]])


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args)``: run ``svd-serve ARGS`` in-process; returns (exit code, stdout+stderr)."""
    return invoke


@pytest.fixture(scope="session")
def trained_adapter(tiny_model, qa_data, tmp_path_factory) -> Path:
    """A KaSA adapter trained by the CLI for one step on tiny llama (seed 0). Tests only read it."""
    out = tmp_path_factory.mktemp("adapter") / "kasa"
    code, output = invoke("train", "--base", tiny_model("llama"), "--data", qa_data, "--steps", 1,
                          "--no-progress", "--out", out)
    assert code == 0, output
    return out


@pytest.fixture(scope="session")
def env(tiny_model):
    """``env(arch)``: the base model, its all-linear targets, calibration covariances and Fisher rows,
    fixed inputs."""
    from transformers import AutoTokenizer

    from svd_serve.calib import fisher_rows, input_covariances
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import CORPUS

    cache: dict[str, Env] = {}

    def get(arch: str) -> Env:
        if arch not in cache:
            path = tiny_model(arch)
            model = load_base(path)
            targets = resolve_targets(model, "all-linear")
            tok = AutoTokenizer.from_pretrained(path)
            rows = [{"text": t} for t in CORPUS[:8]]
            covs = input_covariances(model, targets, rows, tok)
            fisher = fisher_rows(model, targets, rows, tok)
            ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
            cache[arch] = Env(path, model, targets, covs, fisher, ids, logits(model, ids))
        return cache[arch]

    return get


def pytest_terminal_summary(terminalreporter):
    """Say how many ``gpu`` tests did not run, and why: a skip is never a pass."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "gpu" in getattr(r, "keywords", {})]
    if skipped:
        reasons = sorted({str(r.longrepr[2]).removeprefix("Skipped: ") if isinstance(r.longrepr, tuple) else "skipped"
                          for r in skipped})
        terminalreporter.write_line(f"GPU tests: {len(skipped)} did not run ({'; '.join(reasons)})")
