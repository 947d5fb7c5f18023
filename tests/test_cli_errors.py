"""Bad input gives one ``error:`` line, a non-zero exit, no traceback and no output left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import one_error

from svd_serve.tiny import build_tiny_model


def assert_clean_failure(code: int, output: str, out: Path, *needles: str) -> str:
    """:func:`one_error`, and nothing left at ``out`` (not even a temporary)."""
    error = one_error(code, output, *needles)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return error


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama-seed1") / "model", "llama", seed=1)


def train_args(base, data, out, *extra):
    return ["train", "--base", base, "--data", data, "--out", out, "--steps", "1", *extra]


def test_missing_base_directory(run_cli, qa_data, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(*train_args(tmp_path / "nope", qa_data, out))
    assert_clean_failure(code, output, out, "not found", str(tmp_path / "nope"))


def test_base_directory_without_weights(run_cli, tiny_model, qa_data, tmp_path):
    base = tmp_path / "noweights"
    shutil.copytree(tiny_model("llama"), base, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "out"
    code, output = run_cli(*train_args(base, qa_data, out))
    assert_clean_failure(code, output, out, "no weights")


def test_unknown_method(run_cli, tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(*train_args(tiny_model("llama"), qa_data, out, "--method", "nosuch"))
    assert_clean_failure(code, output, out, "nosuch")


def test_rank_not_below_min_dimension(run_cli, tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"  # q_proj is 64 x 64
    code, output = run_cli(*train_args(tiny_model("llama"), qa_data, out, "--targets", "q_proj", "--rank", "64"))
    assert_clean_failure(code, output, out, "rank 64", "q_proj")


def test_target_that_matches_nothing(run_cli, tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(*train_args(tiny_model("llama"), qa_data, out, "--targets", "q_proj,nosuch_proj"))
    assert_clean_failure(code, output, out, "nosuch_proj")


def test_malformed_json_line(run_cli, tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    out = tmp_path / "out"
    code, output = run_cli(*train_args(tiny_model("llama"), data, out))
    assert_clean_failure(code, output, out, f"{data}:3:", "malformed JSON")


@pytest.mark.parametrize("command", ["fold", "export"])
def test_adapter_on_a_different_base(command, run_cli, trained_adapter, other_llama, tmp_path):
    out = tmp_path / "out"
    args = ["--base", other_llama, "--adapter", trained_adapter, "--out", out]
    code, output = run_cli(command, *args, *(["--target", "peft"] if command == "export" else []))
    assert_clean_failure(code, output, out, "different base")


def test_the_same_adapter_folds_onto_its_own_base(run_cli, trained_adapter, tiny_model, tmp_path):
    """The control for the test above: the adapter itself is fine."""
    code, output = run_cli("fold", "--base", tiny_model("llama"), "--adapter", trained_adapter,
                           "--out", tmp_path / "folded")
    assert code == 0, output
    assert (tmp_path / "folded" / "config.json").is_file()


def test_non_linear_target(run_cli, tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(*train_args(tiny_model("llama"), qa_data, out, "--targets", "post_attention_layernorm"))
    assert_clean_failure(code, output, out, "model.layers.0.post_attention_layernorm", "not nn.Linear")
