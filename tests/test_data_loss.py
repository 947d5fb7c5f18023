"""No command loses the user's data: an --out that is an input, an existing directory of other files,
or an earlier output without --overwrite is refused, and temporaries of killed runs are cleaned up."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) with its content hash."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def writing_commands(base: Path, trained_adapter: Path, data: Path):
    """Each writing command, as a function of its --out."""
    return {
        "fold": lambda out: ["fold", "--base", base, "--adapter", trained_adapter, "--out", out],
        "export-peft": lambda out: ["export", "--target", "peft", "--base", base, "--adapter", trained_adapter,
                                    "--out", out],
        "export-vllm": lambda out: ["export", "--target", "vllm", "--base", base, "--adapter", trained_adapter,
                                    "--out", out],
        "merge": lambda out: ["merge", "--base", base, "--adapter", trained_adapter, "--method", "linear",
                              "--max-rank", "4", "--out", out],
        "train": lambda out: ["train", "--base", base, "--data", data, "--method", "lora", "--steps", "1",
                              "--no-progress", "--out", out],
    }


@pytest.mark.parametrize("command", ["fold", "export-peft", "export-vllm", "merge"])
def test_out_is_the_adapter(run_cli, tiny_model, qa_data, trained_adapter, command):
    before = digest(trained_adapter)
    args = writing_commands(tiny_model("llama"), trained_adapter, qa_data)[command]
    for extra in ([], ["--overwrite"]):  # even --overwrite never replaces an input
        code, output = run_cli(*args(trained_adapter), *extra)
        one_error(code, output, "is the input")
        assert digest(trained_adapter) == before


@pytest.mark.parametrize("command", ["fold", "export-peft", "merge", "train"])
def test_out_inside_or_around_an_input(run_cli, tiny_model, qa_data, trained_adapter, command):
    base = tiny_model("llama")
    before = digest(base)
    args = writing_commands(base, trained_adapter, qa_data)[command]
    code, output = run_cli(*args(base / "sub"))
    one_error(code, output, "lies inside the input")
    code, output = run_cli(*args(base.parent), "--overwrite")
    one_error(code, output, "contains the input")
    assert digest(base) == before


@pytest.mark.parametrize("command", ["fold", "export-peft", "export-vllm", "merge", "train"])
def test_directory_of_other_files(run_cli, tiny_model, qa_data, trained_adapter, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    args = writing_commands(tiny_model("llama"), trained_adapter, qa_data)[command]
    code, output = run_cli(*args(out))
    one_error(code, output, "not empty", "--overwrite")
    code, output = run_cli(*args(out), "--overwrite")
    one_error(code, output, "did not write")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("command", ["fold", "export-peft", "export-vllm", "merge", "train"])
def test_earlier_output_needs_overwrite(run_cli, tiny_model, qa_data, trained_adapter, tmp_path, command):
    out = tmp_path / "out"
    args = writing_commands(tiny_model("llama"), trained_adapter, qa_data)[command]
    code, output = run_cli(*args(out))
    assert code == 0, output
    first = digest(out)
    code, output = run_cli(*args(out))
    one_error(code, output, "not empty", "--overwrite")
    assert digest(out) == first
    code, output = run_cli(*args(out), "--overwrite")
    assert code == 0, output
    assert {k for k in digest(out) if "checkpoints" not in k} >= {k for k in first if "checkpoints" not in k}


def test_train_onto_an_adapter_of_another_method(run_cli, tiny_model, qa_data, trained_adapter, tmp_path):
    import shutil

    copy = tmp_path / "kasa"
    shutil.copytree(trained_adapter, copy)
    before = digest(copy)
    code, output = run_cli(*writing_commands(tiny_model("llama"), copy, qa_data)["train"](copy))
    one_error(code, output, "not empty")
    assert digest(copy) == before
    code, output = run_cli(*writing_commands(tiny_model("llama"), copy, qa_data)["train"](copy), "--overwrite")
    assert code == 0, output
    import json

    assert json.loads((copy / "svd_adapter.json").read_text())["method"] == "lora"


def test_stale_temporary_of_a_dead_process_is_removed(run_cli, tiny_model, trained_adapter, tmp_path):
    out = tmp_path / "folded"
    # a process id that is certainly gone: a child that has exited and been reaped
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".folded.tmp-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".folded.tmp-{sleeper.pid}"  # a live run's temporary: left alone
        busy.mkdir()
        code, output = run_cli("fold", "--base", tiny_model("llama"), "--adapter", trained_adapter, "--out", out)
        assert code == 0, output
        assert not stale.exists() and f"removed {stale}" in output
        assert busy.is_dir() and str(busy) not in output
    finally:
        sleeper.kill()
        sleeper.wait()
