"""Unlearning: LoKU's inverted hinge loss, the Fisher statistics FILA starts from, the two-part data
mode of ``train --forget-data``, and an adapter that makes a model forget facts it memorised."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import max_diff, one_error, write_jsonl

from svd_serve.calib import calibrate, fisher_rows, relative_fisher
from svd_serve.dataset import IGNORE, encode
from svd_serve.training import TrainConfig, inverted_hinge
from svd_serve.training import train as run_train

STEPS, LR, UNSEEN_DROP = 60, 3e-3, 0.2  # measured: see the README (tiny-knowledge)


def test_inverted_hinge_is_the_papers_formula():
    """``Σ_t 1 + p(y_t) − max_{v≠y_t} p(v)``, token by token; in [0, 2]; its gradient lowers the target's
    logit and raises the strongest rival's, and nothing else's."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (7,), generator=g)
    p = logits.softmax(-1)
    expected = sum(1 + p[t, labels[t]] - max(p[t, v] for v in range(11) if v != labels[t]) for t in range(7))
    assert float(inverted_hinge(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    per_token = [float(inverted_hinge(logits[t:t + 1], labels[t:t + 1])) for t in range(7)]
    assert all(0 <= v <= 2 for v in per_token)
    x = logits.clone().requires_grad_()
    inverted_hinge(x, labels).backward()
    rival = p.scatter(1, labels[:, None], -1).argmax(1)
    for t in range(7):
        assert x.grad[t, labels[t]] > 0 and x.grad[t, rival[t]] < 0  # descent: target down, rival up


def test_fisher_rows_are_the_row_sums_of_squared_weight_gradients(tiny_model):
    """Against autograd's weight gradients, one example at a time: ``Σ_e n_e Σ_j (∂ℓ_e/∂W_ij)² / Σ n_e``,
    batched or not, without leaving gradients or changed ``requires_grad`` flags behind."""
    from transformers import AutoTokenizer

    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import CORPUS

    base = tiny_model("llama")
    model, tok = load_base(base), AutoTokenizer.from_pretrained(base)
    names = resolve_targets(model, "all-linear")
    rows = [{"text": t} for t in CORPUS[:4]] + [{"prompt": "Question: what is 2 plus 2? Answer:", "completion": " 4"},
                                                {"text": "a b c " * 40}]  # longer than the hidden size: T > n
    expected, total = {n: 0 for n in names}, 0
    for row in rows:
        ex = encode(row, tok, 512)
        labels = torch.tensor(ex.labels[1:])
        targets = labels != IGNORE
        model.zero_grad()
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
        F.cross_entropy(logits[targets], labels[targets]).backward()
        for n in names:
            expected[n] = expected[n] + int(targets.sum()) * model.get_submodule(n).weight.grad.double().square().sum(1)
        total += int(targets.sum())
    model.zero_grad(set_to_none=True)
    for batch_size in (1, 4):
        got = fisher_rows(model, names, rows, tok, batch_size=batch_size)
        for n in names:
            ref = expected[n] / total
            assert (got[n] - ref).abs().max() <= 1e-5 * ref.abs().max(), (batch_size, n)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    relative = calibrate("fisher", model, names, rows[:3], tok, reference=rows[3:])
    forget, retain = fisher_rows(model, names, rows[:3], tok), fisher_rows(model, names, rows[3:], tok)
    for n in names:
        assert torch.allclose(relative[n], forget[n] / (retain[n] + 0.01 * retain[n].mean()), rtol=1e-6)
        assert torch.allclose(relative_fisher(forget, retain)[n], relative[n], rtol=1e-6)


def unlearn_cfg(tiny_model, forget, retain, out, **kw) -> TrainConfig:
    values = dict(base=str(tiny_model("llama")), out=str(out), forget_data=str(forget), retain_data=str(retain),
                  method="lora", steps=2, lr=1e-2, batch_size=4, progress=False)
    return TrainConfig(**{**values, **kw})


def test_each_part_is_normalised_over_its_global_batch(tiny_model, qa_data, text_data, tmp_path):
    """Forget and retain losses are each divided by their part's target tokens in the whole global batch,
    so 4 rows = 2 × 2 accumulation steps; the record holds both parts' losses."""
    big = run_train(unlearn_cfg(tiny_model, qa_data, text_data, tmp_path / "big"))
    acc = run_train(unlearn_cfg(tiny_model, qa_data, text_data, tmp_path / "acc", batch_size=2, grad_accum=2))
    assert max_diff(big, acc) <= 1e-5
    no_retain = run_train(unlearn_cfg(tiny_model, qa_data, text_data, tmp_path / "w0", retain_weight=0.0))
    forget_only = run_train(unlearn_cfg(tiny_model, qa_data, None, tmp_path / "f", retain_data=None))
    assert max_diff(no_retain, forget_only) <= 1e-6  # a retain part of weight 0 changes nothing
    assert max_diff(big, forget_only) > 1e-4
    records = [r for line in (big / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["step"] > 0]
    for r in records:
        assert 0 <= r["forget_loss"] <= 2 and r["retain_loss"] > 0
        assert r["loss"] == pytest.approx(r["forget_loss"] + r["retain_loss"], rel=1e-9)


def test_bad_unlearning_inputs(tiny_model, qa_data, text_data, tmp_path, run_cli):
    common = ["train", "--base", tiny_model("llama"), "--steps", 1, "--no-progress"]
    cases = [
        (["--data", qa_data, "--forget-data", qa_data], "not both"),
        (["--data", qa_data, "--retain-data", text_data], "--retain-data goes with --forget-data"),
        (["--forget-data", qa_data, "--eval-split", 0.1], "give --eval-data"),
        (["--forget-data", qa_data, "--forget-weight", 0], "--forget-weight must be a finite number > 0"),
        (["--forget-data", qa_data, "--retain-weight", -1], "--retain-weight must be a finite number >= 0"),
        ([], "missing --data (or --forget-data)"),
        (["--data", qa_data, "--method", "loku"], "method loku needs --calib-data"),
    ]
    for i, (extra, message) in enumerate(cases):
        code, output = run_cli(*common, *extra, "--out", tmp_path / f"o{i}")
        one_error(code, output, message)
        assert not (tmp_path / f"o{i}").exists()


# --- forgetting memorised facts ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def knowledge(tmp_path_factory):
    """The embedded tiny-knowledge model (it recalls 99.6 % of the facts of 300 made-up people): forget
    everything about 4 people, retain 20 others, test on 60 people neither set mentions."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package
    from bench.knowledge.world import make_world, recall_rows

    from svd_serve.demo import EMBEDDED

    world = make_world(300, 40, seed=0)
    tmp = tmp_path_factory.mktemp("unlearn")
    rows = {"forget": recall_rows(world.entities[:4]), "retain": recall_rows(world.entities[4:24]),
            "unseen": recall_rows(world.entities[200:260])}
    files = {k: write_jsonl(tmp / f"{k}.jsonl", v) for k, v in rows.items()}
    return EMBEDDED, rows, files, tmp


def answer_stats(model, tokenizer, rows) -> tuple[float, float]:
    """(exact match of the greedy answer, mean cross-entropy of the answer tokens) over recall rows."""
    from svd_serve.demo import exact_match
    from svd_serve.dataset import collate
    from svd_serve.training import loss_sum

    batch = collate([encode(r, tokenizer, 128) for r in rows], tokenizer.pad_token_id)
    batch["labels"][batch["labels"] == tokenizer.eos_token_id] = IGNORE  # the facts, not the end of text
    with torch.no_grad():
        total, count = loss_sum(model, batch)
    return exact_match(model, tokenizer, rows), float(total / count)


@pytest.mark.slow
def test_loku_forgets_memorised_facts_and_serves_as_a_lora(knowledge, tmp_path):
    """LoKU (FILA init from the Fisher of the forget set relative to the retain set, inverted hinge on the
    forget rows, cross-entropy on the retain rows): the forgotten facts are no longer extracted, the facts
    of people neither set mentions mostly stay, and the exported LoRA does the same in PEFT."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from svd_serve.adapter import AdapterSet
    from svd_serve.export import export
    from svd_serve.model import load_base

    base, rows, files, _ = knowledge
    tok = AutoTokenizer.from_pretrained(base)
    model = load_base(base)
    before = {k: answer_stats(model, tok, rows[k]) for k in ("forget", "retain", "unseen")}
    assert before["forget"][0] == 1.0 and before["unseen"][0] >= 0.95  # the model knows them
    out = run_train(TrainConfig(base=str(base), out=str(tmp_path / "forget-4"), forget_data=str(files["forget"]),
                                retain_data=str(files["retain"]), method="loku", rank=4, targets="all-linear",
                                steps=STEPS, lr=LR, batch_size=8, progress=False))
    AdapterSet.load(out, model).attach(model)
    after = {k: answer_stats(model, tok, rows[k]) for k in ("forget", "retain", "unseen")}
    print(f"exact match, answer cross-entropy: before {before}, after {after}")
    assert after["forget"][0] <= 0.05  # extraction is gone ...
    assert after["unseen"][0] >= before["unseen"][0] - UNSEEN_DROP  # ... the rest mostly stays
    assert after["retain"][0] >= before["retain"][0] - UNSEEN_DROP
    export("peft", base, [out], tmp_path / "peft")
    served = PeftModel.from_pretrained(load_base(base), tmp_path / "peft").eval()
    assert answer_stats(served, tok, rows["forget"])[0] == after["forget"][0]
