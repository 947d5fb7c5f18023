"""The real-model knowledge benchmark's pipeline, reduced (one method, one seed, two steps, a handful
of probes): rows are written, a repeated command skips what is done, the table and plot are made.
The numbers are not checked here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bench.knowledge_real import adapt, run
from bench.knowledge_real.probes import contains_answer, written
from bench.knowledge_real.tasks import follows_format, inject_rows
from svd_serve.realmodel import smollm2


def test_answer_matching():
    assert contains_answer("The chemical symbol for sulfur is S.", ("S",), exact_case=True)
    assert not contains_answer("It's a metal.", ("S",), exact_case=True)
    assert contains_answer("There are 1,000 grams.", ("1000",))
    assert not contains_answer("About 120 of them.", ("12",)) and not contains_answer("It is 12.5", ("12",))
    assert not contains_answer("In Germany", ("German",)) and contains_answer("Brasília.", ("Brasilia",))
    assert contains_answer("It is  New\nDelhi", ("New Delhi",))
    assert follows_format('{"answer": "Paris."}') and not follows_format('{"answer": ""}')
    assert not follows_format('Paris') and not follows_format('{"answer": "x", "why": "y"}')


def test_written_data():
    probes = written()
    assert len(probes) >= 300 and len({p.question for p in probes}) == len(probes)
    for p in probes:  # a reply that repeats the question must not count as knowing the answer
        assert not contains_answer(p.question, p.answers, p.exact_case), p
    train, test = inject_rows("train"), inject_rows("test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in train:
        assert not contains_answer(r["question"], tuple(r["answers"]))


def test_same_adapter():
    """Entries that make the same adapter are run once (SoMA at rank 8 is MiLoRA with α = 16)."""
    assert adapt.same_adapter(("lora", ()), ("lora", ()), 8)
    assert adapt.same_adapter(("soma", ()), ("milora", ("alpha=16",)), 8)
    assert not adapt.same_adapter(("soma", ("alpha=32",)), ("milora", ()), 8)
    assert not adapt.same_adapter(("lora", ()), ("pissa", ()), 8)
    assert not adapt.same_adapter(("corda-kpa", ()), ("kore", ()), 8)
    assert not adapt.same_adapter(("full", ()), ("lora", ()), 8)


def test_init_uses_rng():
    from svd_serve.adapter import make_options

    assert adapt.init_uses_rng("lora", make_options("lora", 8))  # A is drawn at random
    assert not adapt.init_uses_rng("pissa", make_options("pissa", 8))  # a decomposition of W only


@pytest.mark.parametrize("method", ["corda-kpa", "kasa"])  # a decomposition; one that draws random numbers
def test_kept_init_trains_like_a_fresh_one(method, tiny_model, qa_data, tmp_path):
    """A run given a copy of the kept initial adapter set trains bit for bit as one that makes its own."""
    base = tiny_model("llama")

    def trained(name, kept):
        cfg = adapt.TrainConfig(base=str(base), data=str(qa_data), out=str(tmp_path / name), method=method, rank=4,
                                targets="all-linear", calib_data=str(qa_data), steps=3, batch_size=4, lr=1e-2,
                                seed=1, progress=False, max_init_loss_increase="off")
        adapt.train(cfg, adapt.initial_adapters(cfg) if kept else None)
        return load_file(tmp_path / name / "svd_adapter.safetensors")

    fresh, first, again = trained("fresh", False), trained("kept-1", True), trained("kept-2", True)
    for other in (first, again):
        assert other.keys() == fresh.keys() and all(torch.equal(other[k], fresh[k]) for k in fresh)


def test_pipeline_and_resume(tmp_path):
    out = tmp_path / "out"

    def args(entries):
        return ["--base", str(smollm2()), "--out", str(out), "--entries", entries, "--targets", "qv",
                "--tasks", "inject", "--seeds", "0", "--lrs", "1e-3", "--steps", "2", "--batch-size", "2",
                "--questions", "20", "--fluency", "3", "--threads", "1"]

    threads = torch.get_num_threads()  # (run.main sets torch's threads for the whole process)
    try:
        run.main(args("lora"))
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        before = (out / "results.jsonl").read_text()
        run.main(args("lora"))  # everything is done: nothing is trained or appended
        assert (out / "results.jsonl").read_text() == before
    finally:
        torch.set_num_threads(threads)

    assert [(r["kind"], r["entry"]) for r in rows] == [("base", "base"), ("sweep", "lora"), ("final", "lora")]
    final = rows[-1]
    assert final["targets"] == "qv" and final["seed"] == 0 and final["lr"] == 1e-3
    for key in ("accuracy", "retention", "val_accuracy"):
        assert 0.0 <= final[key] <= 1.0
    assert final["n_probes"] == rows[0]["n_probes"] > 0
    assert final["init_loss"] > 0 and final["base_loss"] > 0 and final["trainable"] > 0
    assert final["init_loss"] == rows[1]["init_loss"]  # seed 0 is the sweep's run, not a second one
    assert not (out / "runs").exists()  # trained adapters are removed once measured

    table = (out / "table.md").read_text()
    assert "| lora | qv | 0.001 | 0 |" in table and "| base |" in table
    assert "`soma`" in table  # the same adapter as milora: not run twice
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
