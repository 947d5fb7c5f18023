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
from svd_serve.training import TrainConfig, global_batch, load_config, lr_at
from svd_serve.training import train as run_train


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
def test_packed_and_padding_free_rows_give_the_padded_loss_and_gradients(tiny_model, arch):
    """Several examples per row (positions restarting at 0), or all of them in one row without padding
    (their boundaries read by the attention): the model keeps them apart, so the loss (sum and target
    count) and every adapter gradient are the padded batch's, from fewer rows or fewer tokens; a model
    that mixed them is caught and gets padded batches."""
    from transformers import AutoTokenizer

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.dataset import collate, collate_flat, collate_packed, encode
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import CORPUS
    from svd_serve.training import batching, loss_sum, sdpa_attention

    model, tok = load_base(tiny_model(arch)), AutoTokenizer.from_pretrained(tiny_model(arch))
    examples = [encode({"text": t}, tok, 128) for t in [" ".join(CORPUS[:4]), *CORPUS[4:10]]]
    packed, padded, flat = (f(examples, tok.pad_token_id) for f in (collate_packed, collate, collate_flat))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert flat["input_ids"].numel() == sum(len(e.input_ids) for e in examples) < padded["input_ids"].numel()
    assert batching(model, examples, tok.pad_token_id).func is collate_flat  # transformers' packed masks
    assert sdpa_attention(model)  # the attention that reads the boundaries (no block mask)
    assert batching(model, examples, tok.pad_token_id).func is collate_flat
    adapters = AdapterSet.create(model, "lora", make_options("lora", rank=4), resolve_targets(model, "all-linear"),
                                 progress=False)
    with torch.no_grad():
        for q in adapters.parameters():
            q.normal_(0, 0.1)
    model.requires_grad_(False)
    adapters.attach(model)
    results = []
    for batch in (padded, packed, flat):
        ce, n = loss_sum(model, batch)
        ce.backward()
        results.append((ce.detach(), n, {k: q.grad.clone() for k, q in adapters.named_parameters()}))
        adapters.zero_grad(set_to_none=True)
    (ce_pad, n_pad, g_pad) = results[0]
    for ce, n, g in results[1:]:
        assert n == n_pad and abs(ce - ce_pad) <= 1e-5 * ce_pad
        for k in g_pad:
            assert (g[k] - g_pad[k]).abs().max() <= 1e-4 * g_pad[k].abs().max(), k

    class IgnoresPositions(torch.nn.Module):  # one causal sequence per row: the examples would mix
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
            return self.inner(**kwargs)

    assert batching(IgnoresPositions(), examples, tok.pad_token_id).func is collate


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gemma", "phi3", "gemma2-softcap"])
def test_head_at_target_positions_gives_the_loss_and_gradients_of_all_logits(tiny_model, arch, tmp_path):
    """``loss_sum`` runs the output head only where a label is: the loss and every adapter gradient are
    those of the logits of all positions (a tied head; Gemma-2's final soft-cap after the head)."""
    from contextlib import nullcontext

    import torch.nn.functional as F
    import transformers

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.dataset import IGNORE, Example, collate, collate_flat, collate_packed
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import build_tiny_model
    from svd_serve.training import logits as head_logits
    from svd_serve.training import loss_sum, sdpa_attention

    if arch == "gemma2-softcap":
        config = transformers.Gemma2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           final_logit_softcapping=2.0)  # small: the cap bends these logits
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float()
    else:
        path = (build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True) if arch == "llama-tied"
                else tiny_model(arch))
        model = load_base(path)
    adapters = AdapterSet.create(model, "lora", make_options("lora", rank=4), resolve_targets(model, "all-linear"),
                                 progress=False)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.1)
    model.requires_grad_(False)
    adapters.attach(model)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (13, 7, 20, 4):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        keep = torch.rand(n, generator=g) < 0.4
        examples.append(Example(ids, [t if k else IGNORE for t, k in zip(ids, keep.tolist())]))
    sdpa_attention(model)
    for batch in (collate(examples, 0), collate_packed(examples, 0), collate_flat(examples, 0)):
        labels = batch["labels"][:, 1:]
        targets = labels != IGNORE
        assert 0 < targets.sum() < targets.numel() // 2  # most positions carry no loss
        grads = []
        for route in ("targets", "all"):
            if route == "targets":
                ce, n = loss_sum(model, batch)
            else:
                logits = head_logits(model, batch, "cpu", nullcontext)
                ce, n = F.cross_entropy(logits[:, :-1][targets], labels[targets], reduction="sum"), targets.sum()
            ce.backward()
            grads.append((ce.detach(), n, {k: p.grad.clone() for k, p in adapters.named_parameters()}))
            adapters.zero_grad(set_to_none=True)
        (ce_t, n_t, g_t), (ce_a, n_a, g_a) = grads
        assert n_t == n_a and abs(ce_t - ce_a) <= 1e-6 * ce_a
        for k in g_a:
            assert (g_t[k] - g_a[k]).abs().max() <= 1e-5 * g_a[k].abs().max(), k
    if arch == "gemma2-softcap":  # the cap really acts: the logits are bounded by it
        assert head_logits(model, batch, "cpu", nullcontext).abs().max() < 2.0


def test_float32_attention_in_bfloat16_runs(tiny_model):
    """CPU bfloat16 training computes attention in float32 (the registry entry takes float32 inputs
    under autocast) and the logits stay within bfloat16's tolerance of the float32 model's."""
    import functools

    from svd_serve.model import load_base
    from svd_serve.training.attention import FLOAT32_SDPA, padding_free_sdpa, sdpa_attention

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = load_base(tiny_model("llama"))(input_ids=ids).logits.detach()
    model = load_base(tiny_model("llama"), torch.bfloat16)
    seen = []
    inner = functools.partial(padding_free_sdpa, float32=True)

    def spy(module, query, key, value, mask, **kwargs):
        seen.append(query.dtype)
        return inner(module, query, key, value, mask, **kwargs)

    assert sdpa_attention(model, float32=True) and model.config._attn_implementation == FLOAT32_SDPA
    from transformers import AttentionInterface

    AttentionInterface.register(FLOAT32_SDPA, spy)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits.float()
    finally:
        AttentionInterface.register(FLOAT32_SDPA, inner)
    assert seen == [torch.bfloat16] * model.config.num_hidden_layers  # called in every layer
    assert (logits - reference).abs().max() <= 2e-2 * reference.abs().max()  # bfloat16: 8 bits of mantissa
    eager = load_base(tiny_model("llama"), torch.bfloat16)
    eager.set_attn_implementation("eager")
    assert not sdpa_attention(eager, float32=True) and eager.config._attn_implementation == "eager"


def test_bfloat16_keeps_adapter_float32(tiny_model, qa_data, tmp_path):
    out = run_train(cfg(tiny_model, qa_data, tmp_path / "bf16", steps=2, dtype="bfloat16", method="lora"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after the init check
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(out).values())


# --- resume -----------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
import torch
import svd_serve.training.checkpoint as c

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
