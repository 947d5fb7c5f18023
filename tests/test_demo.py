"""`svd-serve demo`: a reduced run end to end (few steps), on the embedded base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import MAX_LOGIT_GAP

from svd_serve.converters import TARGETS
from svd_serve.demo import EMBEDDED, demo


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


@torch.no_grad()
def greedy_exact_match(model, tokenizer, rows) -> float:
    """Share of rows whose completion greedy decoding reproduces token for token, one forward pass per
    token: independent of the demo's batched, teacher-forced ``exact_match``."""
    hits = 0
    for r in rows:
        ids = tokenizer(r["prompt"])["input_ids"]
        want = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        for token in want:
            if int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) != token:
                break
            ids = ids + [token]
        else:
            hits += 1
    return hits / len(rows)


@pytest.mark.onnx  # the demo exports to every target, ONNX included
@pytest.mark.slow
def test_reduced_demo(tmp_path, run_cli):
    from transformers import AutoTokenizer

    from svd_serve.adapter import AdapterSet
    from svd_serve.dataset import read_jsonl
    from svd_serve.demo import exact_match
    from svd_serve.model import load_base

    lines = []
    out = tmp_path / "demo"
    summary = demo(out, steps=3, log=lines.append, serve_check=False)  # vLLM serving: tests/test_vllm.py
    text = "\n".join(lines)
    assert "before" in text and "after" in text and "folded checkpoint" in text
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["base"] == str(EMBEDDED) and len(summary["answers"]) == 6
    # the accuracies reported are the base's and the trained adapter's on the held-out rows, and the
    # demo's fast exact match is greedy decoding's (checked on a tenth of the rows: decoding is slow)
    test = read_jsonl(EMBEDDED / "demo_test.jsonl")
    tok, model = AutoTokenizer.from_pretrained(EMBEDDED), load_base(EMBEDDED)
    assert summary["eval_rows"] == len(test)
    for key in ("accuracy_before", "accuracy_after"):
        if key == "accuracy_after":
            AdapterSet.load(out / "kasa-adapter", model).attach(model)
        assert summary[key] == exact_match(model, tok, test)
        assert exact_match(model, tok, test[::10]) == greedy_exact_match(model, tok, test[::10])
    assert (out / "kasa-adapter" / "svd_adapter.json").is_file()
    assert (out / "folded" / "config.json").is_file()
    assert summary["fold_max_logit_gap"] < MAX_LOGIT_GAP[torch.float32]
    assert set(summary["exports"]) == set(TARGETS)
    for target, entry in summary["exports"].items():
        assert "error" not in entry, (target, entry)
        assert entry["max_logit_gap"] < MAX_LOGIT_GAP[torch.float32], target
        assert entry["max_rel_error"] == 0
        assert f"export {target}" in text
    # an earlier demo's output may be overwritten, anything else may not
    code, msg = run_cli("demo", "--out", tmp_path, "--steps", "1")
    assert code == 2 and "not an earlier demo" in msg


def test_bad_steps(tmp_path, run_cli):
    code, msg = run_cli("demo", "--out", tmp_path / "x", "--steps", "0")
    assert code == 2 and "at least 1" in msg and not (tmp_path / "x").exists()
