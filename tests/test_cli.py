"""One command-line vocabulary: every option has help, old spellings are hidden aliases (refused
together with the new one), and the CLI is quiet unless -v."""

from __future__ import annotations

import click
import pytest
from helpers import max_diff

from svd_serve import log
from svd_serve.cli import cli


def commands():
    return sorted(cli.commands.items())


@pytest.mark.parametrize("name, command", commands(), ids=[n for n, _ in commands()])
def test_every_option_has_help(name, command):
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"svd-serve {name} {param.opts[0]} has no help"


def test_old_spellings_are_hidden(run_cli):
    for command, old, new in (("merge", "--rank", "--max-rank"), ("extract", "--rank", "--max-rank")):
        code, out = run_cli(command, "--help")
        assert code == 0 and new in out and f"{old} " not in out, out
    code, out = run_cli("import", "--help")
    assert code == 0 and "--adapter" in out and "Usage: svd-serve import [OPTIONS]\n" in out, out


def test_merge_rank_alias(run_cli, tiny_model, trained_adapter, tmp_path):
    args = ["merge", "--base", tiny_model("llama"), "--adapter", trained_adapter, "--method", "linear"]
    assert run_cli(*args, "--max-rank", 3, "--out", tmp_path / "new")[0] == 0
    assert run_cli(*args, "--rank", 3, "--out", tmp_path / "old")[0] == 0
    assert max_diff(tmp_path / "new", tmp_path / "old") == 0
    code, out = run_cli(*args, "--rank", 3, "--max-rank", 3, "--out", tmp_path / "both")
    assert code == 2 and "give --max-rank only (--rank is its old name)" in out


def test_extract_rank_alias(run_cli, tiny_model, tmp_path):
    base = tiny_model("llama")
    for flag in ("--max-rank", "--rank"):  # both reach extract, which finds nothing to extract
        code, out = run_cli("extract", "--base", base, "--finetuned", base, flag, 2, "--out", tmp_path / "x")
        assert code == 2 and "does not differ" in out, out


def test_import_adapter_option_and_old_positional(run_cli, tiny_model, tmp_path):
    base, missing = tiny_model("llama"), tmp_path / "no-such-adapter"
    common = ["import", "--from", "peft", "--base", base, "--out", tmp_path / "out"]
    new = run_cli(*common, "--adapter", missing)
    old = run_cli(*common, missing)
    assert new[0] == old[0] == 2 and new[1] == old[1] and str(missing) in new[1]
    code, out = run_cli(*common)
    assert code == 2 and "missing --adapter" in out
    code, out = run_cli(*common, "--adapter", missing, missing)
    assert code == 2 and "give --adapter only" in out


def test_quiet_unless_verbose(run_cli):
    try:
        assert run_cli("-v", "methods", "lora")[0] == 0 and log.verbose()
        assert run_cli("methods", "lora")[0] == 0 and not log.verbose()
    finally:
        log.set_verbose(False)
