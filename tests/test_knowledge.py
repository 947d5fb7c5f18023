"""The knowledge benchmark: a seeded world, a base pretrained on it, a reduced run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench.knowledge import pretrain, run  # noqa: E402
from bench.knowledge.world import ATTRIBUTES, make_world, qa_rows, recall_rows, statement  # noqa: E402


def test_world_is_seeded_and_consistent():
    a, b, c = make_world(20, 5, seed=3), make_world(20, 5, seed=3), make_world(20, 5, seed=4)
    assert a == b and a != c
    names = [e.name for e in a.entities + a.new]
    assert len(set(names)) == 25
    assert {e.name for e in a.qa_train}.isdisjoint(e.name for e in a.qa_test)
    assert len(a.qa_train) + len(a.qa_test) == 20
    rows = recall_rows(a.entities)
    assert len(rows) == 20 * len(ATTRIBUTES) == len(qa_rows(a.entities))
    for row, (e, attr) in zip(rows, [(e, t) for e in a.entities for t in ATTRIBUTES]):
        assert row["prompt"] + row["completion"] + "." == statement(e, attr)
        assert row["completion"] == " " + e.facts[attr]


def test_summary_statistics():
    rows = [{"task": "qa", "method": "m", "seed": s, "accuracy": acc, "retention": 1.0}
            for s, acc in enumerate([0.5, 0.7])]
    stats = run.summarise(rows)[("qa", "m")]
    assert stats["n"] == 2 and stats["seeds"] == [0, 1] and stats["accuracy"] == pytest.approx(0.6)
    assert stats["accuracy_std"] == pytest.approx(0.02 ** 0.5) and stats["retention_std"] == 0


def test_reduced_benchmark_end_to_end(tmp_path):
    world = make_world(8, 4, seed=1)
    model, tok, recall, _ = pretrain.pretrain(world, steps=30, batch_size=8, eval_every=30, log=lambda _: None,
                                           hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2)
    base = pretrain.save(tmp_path / "base", model, tok, world, recall, {})
    assert pretrain.load_world(base) == world
    out = tmp_path / "results"
    argv = ["--base", str(base), "--out", str(out), "--methods", "lora", "--seeds", "0", "--steps", "4"]
    run.main(argv)
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["method"]) for r in results) == [
        ("inject", "base"), ("inject", "lora"), ("qa", "base"), ("qa", "lora")]
    for r in results:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["retention"] <= 1
    # the benchmark's retention of the untouched base is the recall pretraining measured
    base_row = next(r for r in results if r["method"] == "base")
    assert base_row["retention"] == pytest.approx(recall)
    table = (out / "table.md").read_text()
    assert "| lora | 0 |" in table and "| base | 0 |" in table
    assert f"python -m bench.knowledge.run --out {out} --methods lora --seeds 0 --tasks qa,inject --steps 4" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.main(argv)  # finished runs are not repeated
    assert len((out / "results.jsonl").read_text().splitlines()) == len(results)
