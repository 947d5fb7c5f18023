"""`svd-serve demo`: a reduced run end to end (few steps), on the embedded base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from svd_serve.converters import TARGETS
from svd_serve.demo import EMBEDDED, demo

from conftest import TOLERANCE


def test_embedded_base_recalls_its_facts():
    """The packaged base is what bench/knowledge/pretrain.py wrote: ≥ 90% recall of its world."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.knowledge.pretrain import load_world
    from bench.knowledge.world import recall_rows
    from svd_serve.demo import exact_match
    from svd_serve.model import load_base

    rows = recall_rows(load_world(EMBEDDED).entities)
    model, tok = load_base(EMBEDDED), AutoTokenizer.from_pretrained(EMBEDDED)
    assert exact_match(model, tok, rows[::5]) >= 0.9


def test_reduced_demo(tmp_path, run_cli):
    lines = []
    out = tmp_path / "demo"
    summary = demo(out, steps=3, log=lines.append, serve_check=False)  # vLLM serving: tests/test_vllm.py
    text = "\n".join(lines)
    assert "before" in text and "after" in text and "folded checkpoint" in text
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["base"] == str(EMBEDDED) and len(summary["answers"]) == 6
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert (out / "kasa-adapter" / "svd_adapter.json").is_file()
    assert (out / "folded" / "config.json").is_file()
    assert summary["fold_max_logit_gap"] < TOLERANCE[torch.float32]
    assert set(summary["exports"]) == set(TARGETS)
    for target, entry in summary["exports"].items():
        assert "error" not in entry, (target, entry)
        assert entry["max_logit_gap"] < TOLERANCE[torch.float32], target
        assert entry["max_rel_error"] == 0
        assert f"export {target}" in text
    # an earlier demo's output may be overwritten, anything else may not
    code, msg = run_cli("demo", "--out", tmp_path, "--steps", "1")
    assert code == 2 and "not an earlier demo" in msg


def test_bad_steps(tmp_path, run_cli):
    code, msg = run_cli("demo", "--out", tmp_path / "x", "--steps", "0")
    assert code == 2 and "at least 1" in msg and not (tmp_path / "x").exists()
