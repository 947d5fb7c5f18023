"""Data-parallel training: 2 CPU processes (gloo, launched by torchrun) × batch 2 = 1 process × batch 4."""

from __future__ import annotations

import json

from helpers import max_diff, train_two_processes


def test_two_processes_equal_one(tiny_model, text_data, tmp_path, run_cli):
    args = ["train", "--base", tiny_model("llama"), "--data", text_data, "--method", "kasa", "--steps", 4,
            "--lr", 1e-2, "--save-every", 2, "--eval-split", 0.2, "--no-progress"]
    code, output = run_cli(*args, "--batch-size", 4, "--out", tmp_path / "one")
    assert code == 0, output

    train_two_processes(args, tmp_path / "two")

    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-4
    # only rank 0 writes: one record per step, and the same losses as the single process
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]  # the init check, then one record per step
    assert abs(one[0]["init_check"]["increase"] - two[0]["init_check"]["increase"]) <= 1e-5
    for a, b in zip(one[1:], two[1:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["tokens"] == b["tokens"]
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in a:
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4
    assert (tmp_path / "two" / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
