"""The training loop: equal updates however a global batch is split, exact resume after SIGKILL,
config files, records, regularizer overrides, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import adapter_tensors, max_diff

from svd_serve.errors import SvdServeError
from svd_serve.train import TrainConfig, global_batch, load_config, lr_at
from svd_serve.train import train as run_train


def cfg(tiny_model, data, out, **kw) -> TrainConfig:
    base = dict(base=str(tiny_model("llama")), data=str(data), out=str(out), steps=3, lr=1e-2, batch_size=4,
                progress=False)
    return TrainConfig(**{**base, **kw})


# --- pure functions ---------------------------------------------------------------------------------
def test_global_batches_cover_each_epoch_once():
    seen = [i for step in range(5) for i in global_batch(step, 10, 4, seed=1)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch
    assert global_batch(3, 10, 4, seed=1) == seen[12:16]  # a function of the step alone


def test_lr_schedule():
    c = TrainConfig(base="b", data="d", out="o", lr=1.0, warmup=3, schedule="cosine")
    assert [lr_at(s, c, 13) for s in range(3)] == [0.25, 0.5, 0.75]
    assert lr_at(3, c, 13) == 1.0 and lr_at(8, c, 13) == pytest.approx(0.5) and lr_at(13, c, 13) == pytest.approx(0)
    c.schedule = "linear"
    assert lr_at(8, c, 13) == pytest.approx(0.5) and lr_at(10, c, 13) == pytest.approx(0.3)
    c.warmup = 0.25  # a fraction of 8 steps = 2 warmup steps
    assert lr_at(0, c, 8) == pytest.approx(1 / 3) and lr_at(2, c, 8) == 1.0


# --- equal updates ----------------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch(tiny_model, text_data, tmp_path):
    """Loss is normalised by the target tokens of the whole global batch, so 4 = 2 × 2 (rows of very
    different lengths: a mean of per-micro-batch means would differ). KaSA: the regularizer counts once."""
    big = run_train(cfg(tiny_model, text_data, tmp_path / "big"))
    acc = run_train(cfg(tiny_model, text_data, tmp_path / "acc", batch_size=2, grad_accum=2))
    one = run_train(cfg(tiny_model, text_data, tmp_path / "one", steps=1))
    assert max_diff(big, acc) <= 1e-5
    assert max_diff(big, one) > 1e-3  # training moved the adapter: the comparison means something
    trained = adapter_tensors(big)
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in trained.items())  # B starts at 0


def test_gradient_checkpointing_changes_nothing(tiny_model, qa_data, tmp_path):
    a = run_train(cfg(tiny_model, qa_data, tmp_path / "a", steps=2, method="lora"))
    b = run_train(cfg(tiny_model, qa_data, tmp_path / "b", steps=2, method="lora", gradient_checkpointing=True))
    assert max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("method", ["kasa", "pissa"])
def test_absorbed_frozen_terms_train_the_same_adapter(tiny_model, qa_data, tmp_path, method):
    a = run_train(cfg(tiny_model, qa_data, tmp_path / "plain", steps=2, method=method, absorb_frozen=False))
    b = run_train(cfg(tiny_model, qa_data, tmp_path / "absorbed", steps=2, method=method))  # the default
    assert max_diff(a, b) <= 1e-5
    from svd_serve.adapter import AdapterSet  # the frozen factors (and so delta()) are untouched

    frozen_a, frozen_b = dict(AdapterSet.load(a).named_buffers()), dict(AdapterSet.load(b).named_buffers())
    assert frozen_a and frozen_a.keys() == frozen_b.keys()
    assert all(torch.equal(frozen_a[k], frozen_b[k]) for k in frozen_a)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3"])
def test_packed_rows_give_the_padded_loss(tiny_model, arch):
    """Several examples per row, positions restarting at 0: the model keeps them apart, so the loss
    (sum and target count) is the padded batch's, from fewer rows; a model that mixed them is caught."""
    from transformers import AutoTokenizer

    from svd_serve.data import collate, collate_packed, encode
    from svd_serve.model import load_base
    from svd_serve.tiny import CORPUS
    from svd_serve.train import loss_sum, packing_is_exact

    model, tok = load_base(tiny_model(arch)), AutoTokenizer.from_pretrained(tiny_model(arch))
    examples = [encode({"text": t}, tok, 128) for t in [" ".join(CORPUS[:4]), *CORPUS[4:10]]]
    packed, padded = collate_packed(examples, tok.pad_token_id), collate(examples, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    with torch.no_grad():
        (ce_packed, n_packed), (ce_padded, n_padded) = (loss_sum(model, b) for b in (packed, padded))
    assert n_packed == n_padded and abs(ce_packed - ce_padded) <= 1e-5 * ce_padded
    assert packing_is_exact(model, examples, tok.pad_token_id)

    class IgnoresPositions(torch.nn.Module):  # one causal sequence per row: the examples would mix
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, position_ids=None, **kwargs):
            return self.inner(**kwargs)

    assert not packing_is_exact(IgnoresPositions(), examples, tok.pad_token_id)


def test_bfloat16_keeps_adapter_float32(tiny_model, qa_data, tmp_path):
    out = run_train(cfg(tiny_model, qa_data, tmp_path / "bf16", steps=2, dtype="bfloat16", method="lora"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after the init check
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(out).values())


# --- resume -----------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
import torch
import svd_serve.checkpoint as c

save = c.save
def save_then_die(out, adapters, state, keep):
    if state.step == 4:  # die in the middle of writing step-4: adapter files written, trainer state not
        torch.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    return save(out, adapters, state, keep)
c.save = save_then_die
from svd_serve.cli import main
main(sys.argv[1:])
"""


def test_resume_after_sigkill_is_exact(tiny_model, qa_data, tmp_path, run_cli):
    args = ["train", "--base", tiny_model("llama"), "--data", qa_data, "--method", "kasa", "--steps", 6,
            "--batch-size", 4, "--lr", 1e-2, "--warmup", 2, "--save-every", 2, "--eval-split", 0.1,
            "--no-progress"]
    code, output = run_cli(*args, "--out", tmp_path / "ref")
    assert code == 0, output

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *map(str, args), "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "step-2" / "trainer_state.pt").is_file()  # the last good checkpoint, intact
    assert not (ckpts / "step-4").exists() and any(p.name.startswith(".step-4.tmp") for p in ckpts.iterdir())
    assert not (out / "svd_adapter.json").exists()

    code, output = run_cli(*args, "--out", out, "--resume")
    assert code == 0, output
    assert "resumed from" in output and "step-2" in output
    assert max_diff(tmp_path / "ref", out) <= 1e-5
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # the init check, then records of the dead run past its checkpoint were dropped
    assert (out / "loss.png").stat().st_size > 0
    assert json.loads((ckpts / "best.json").read_text())["step"] in (2, 4)


def test_resume_refuses_a_different_global_batch(tiny_model, qa_data, tmp_path, run_cli):
    args = ["train", "--base", tiny_model("llama"), "--data", qa_data, "--method", "lora", "--steps", 3,
            "--save-every", 1, "--keep-checkpoints", 1, "--out", tmp_path / "o", "--no-progress"]
    assert run_cli(*args)[0] == 0
    assert [p.name for p in (tmp_path / "o" / "checkpoints").iterdir()] == ["step-2"]  # pruned to the last 1
    code, output = run_cli(*args)
    assert code == 2 and "already holds checkpoints" in output
    code, output = run_cli(*args, "--resume", "--batch-size", 2)
    assert code == 2 and "different data file, global batch" in output


def test_failed_checkpoint_write_keeps_the_last_good_one(tiny_model, qa_data, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    out = tmp_path / "o"
    with pytest.raises(SvdServeError, match="cannot write checkpoint .*step-4: No space left"):
        run_train(cfg(tiny_model, qa_data, out, steps=6, save_every=2, method="lora"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # no step-4, no temp dirs
    assert (out / "checkpoints" / "step-2" / "svd_adapter.safetensors").is_file()


def test_truncated_rows_are_counted(tiny_model, text_data, tmp_path, run_cli):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    rows = [json.loads(line) for line in open(text_data)]
    lengths = sorted(len(tok(r["text"])["input_ids"]) + 1 for r in rows)  # + EOS
    limit = lengths[len(lengths) // 2]
    long = sum(n > limit for n in lengths)
    assert 0 < long < len(rows)
    code, output = run_cli("train", "--base", tiny_model("llama"), "--data", text_data, "--out", tmp_path / "o",
                           "--method", "lora", "--steps", 1, "--max-length", limit, "--no-progress")
    assert code == 0, output
    assert f"note: {long} of {len(rows)} rows truncated to --max-length {limit}" in output


# --- config files and overrides ---------------------------------------------------------------------
def test_config_file_equals_flags(tiny_model, qa_data, tmp_path, run_cli):
    flags = ["--base", tiny_model("llama"), "--data", qa_data, "--method", "kasa", "--steps", 2, "--lr", 1e-2,
             "--batch-size", 2, "--grad-accum", 2, "--reg", "beta=0.5", "--no-progress"]
    assert run_cli("train", *flags, "--out", tmp_path / "flags")[0] == 0
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {tiny_model('llama')}\ndata: {qa_data}\nmethod: kasa\nsteps: 2\nlr: 0.01\n"
                      "batch_size: 2\ngrad-accum: 2\nreg: {beta: 0.5}\nprogress: false\n")
    code, output = run_cli("train", "--config", config, "--out", tmp_path / "file")
    assert code == 0, output
    assert max_diff(tmp_path / "flags", tmp_path / "file") == 0
    saved = json.loads((tmp_path / "file" / "svd_adapter.json").read_text())
    assert saved["options"]["beta"] == 0.5  # --reg maps onto the method's option field
    records = [json.loads(line) for line in (tmp_path / "file" / "metrics.jsonl").open()][1:]  # after the init check
    assert len(records) == 2 and all(r["reg"] > 0 for r in records)


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"base": "b", "data": "d", "out": "o", "lr": 0.1, "method": "sorsa",
                                  "options": {"rank": 4}, "max_grad_norm": 0}))
    c = load_config(config, lr=0.5, reg=["gamma=1e-2"])
    assert (c.lr, c.method, c.options, c.reg, c.max_grad_norm) == (0.5, "sorsa", {"rank": 4}, {"gamma": 1e-2}, None)


def test_config_file_values_are_parsed_by_type(tmp_path):
    """YAML reads ``1e-4`` as a string; each value is parsed by its TrainConfig field's type."""
    config = tmp_path / "run.yaml"
    config.write_text("base: b\ndata: d\nout: o\nlr: 1e-4\neval_split: 5e-2\nsteps: '10'\npack: yes\n"
                      "max_grad_norm: none\n")
    c = load_config(config)
    assert (c.lr, c.eval_split, c.steps, c.pack, c.max_grad_norm) == (1e-4, 0.05, 10, True, None)
    assert type(c.lr) is float and type(c.steps) is int
    config.write_text("base: b\ndata: d\nout: o\nsteps: ten\n")
    with pytest.raises(SvdServeError, match="run.yaml: option steps must be an integer, not 'ten'"):
        load_config(config)


# --- bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs(tiny_model, qa_data, tmp_path, run_cli):
    base = tiny_model("llama")
    common = ["train", "--base", base, "--steps", 1, "--no-progress"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    no_template = tmp_path / "no-template"
    shutil.copytree(base, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "bad.yaml"
    config.write_text("base: x\nlearning_rate: 1\n")
    cases = [
        (["--data", empty, "--out", tmp_path / "o1"], "has no rows"),
        (["--base", no_template, "--data", chat, "--out", tmp_path / "o2"], "chat template"),
        (["--data", qa_data, "--out", blocker / "out"], "cannot create output directory"),
        (["--data", qa_data, "--out", tmp_path / "o3", "--method", "lora", "--reg", "beta=1"], "no regularizer"),
        (["--data", qa_data, "--out", tmp_path / "o4", "--reg", "rank=1"], "not a regularizer coefficient"),
        (["--data", qa_data, "--out", tmp_path / "o5", "--resume"], "no checkpoint"),
        (["--data", qa_data, "--out", tmp_path / "o6", "--eval-split", 1.5], "--eval-split must be in"),
        (["--config", config, "--data", qa_data, "--out", tmp_path / "o7"], "unknown option(s) learning_rate"),
    ]
    for extra, message in cases:
        code, output = run_cli(*common, *extra)
        assert code == 2 and message in output, (extra, output)
        assert "Traceback" not in output
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 4, 6, 7))
