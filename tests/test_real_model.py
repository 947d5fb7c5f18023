"""End to end on the real SmolLM2-135M-Instruct, where a toy model could hide a problem: tied
embeddings, GQA (9 query / 3 key-value heads), head_dim 64, a chat template with a default system
prompt. LoRA, activation-aware KaSA and PiSSA are trained by the CLI for two steps on the default
targets; each adapter is then folded and exported to PEFT, vLLM and ONNX Runtime, and every result is
compared with the native adapted model (the base with the svd-serve adapter attached) on a chat prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MAX_LOGIT_GAP, invoke, scratch_env, write_jsonl

from svd_serve.adapter import AdapterSet
from svd_serve.dataset import read_jsonl
from svd_serve.model import load_base

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
MAX_TOKENS = 8
# two questions of the training rows, on which the three adapters and the base answer differently
QUESTIONS = ["How many days are in a week?", "What is 2 plus 2?"]
# method -> extra train arguments; KaSA drops minor components of real weights: activation-aware choice
RUNS = {"lora": [], "kasa": ["-o", "select=activation"], "pissa": []}


def tol(ref: torch.Tensor) -> float:
    """max |Δ logits| accepted between two float32 computations of the same model: the float32 entry
    of the tolerance table, relative to the logits' magnitude."""
    return MAX_LOGIT_GAP[torch.float32] * max(1.0, float(ref.abs().max()))


@torch.no_grad()
def run(model, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per prompt: its logits, and the greedy tokens after it (HF ``generate``, all MAX_TOKENS of them,
    past EOS as vLLM's ``ignore_eos``)."""
    logits, tokens = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        logits.append(model(input_ids=x).logits[0].float())
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=model.config.pad_token_id)
        tokens.append(out[0, len(ids):].tolist())
    return logits, tokens


def worst(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(max |Δ logits| over the prompts, the tolerance for it)."""
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)), min(map(tol, want))


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The trained adapters, the chat prompt (text and ids), and the native references: logits and
    greedy tokens of the base (key None) and of each adapter attached to it."""
    from transformers import AutoTokenizer

    from svd_serve.realmodel import smollm2

    base = smollm2()
    tmp = tmp_path_factory.mktemp("smol")
    data = write_jsonl(tmp / "train.jsonl", read_jsonl(DATA / "chat-eval.jsonl")[:4])
    calib = write_jsonl(tmp / "calib.jsonl", read_jsonl(DATA / "chat-calib.jsonl")[:8])
    adapters, outputs = {}, {}
    for method, extra in RUNS.items():
        adapters[method] = tmp / "runs" / method
        calib_args = ["--calib-data", calib] if method == "kasa" else []
        code, outputs[method] = invoke("train", "--base", base, "--data", data, "--method", method, "--steps", 2,
                                       "--batch-size", 2, "--lr", "2e-3", "--max-length", 128, "--no-progress",
                                       "--out", adapters[method], *extra, *calib_args)
        assert code == 0, outputs[method]

    tok = AutoTokenizer.from_pretrained(base)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    ids = [tok(t)["input_ids"] for t in texts]
    model = load_base(base).eval()
    refs = {None: run(model, ids)}
    for method, path in adapters.items():
        loaded = AdapterSet.load(path, model)
        loaded.attach(model)
        try:
            refs[method] = run(model, ids)
        finally:
            loaded.detach(model)
    return {"base": base, "tmp": tmp, "adapters": adapters, "train_output": outputs, "tokenizer": tok,
            "messages": messages, "texts": texts, "ids": ids, "refs": refs}


def test_model_and_prompt_are_the_hard_case(smol):
    """What the module is for: the model has the features a toy lacks, the prompt is the chat template
    with its default system prompt, and every adapter changes the model's output."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smol["base"])
    assert config.tie_word_embeddings
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.hidden_size // config.num_attention_heads == 64
    tok, refs = smol["tokenizer"], smol["refs"]
    for ids, messages, text, question in zip(smol["ids"], smol["messages"], smol["texts"], QUESTIONS):
        assert ids == list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
        assert text.startswith("<|im_start|>system\n") and question in text
    for method in RUNS:
        gap, limit = worst(refs[method][0], refs[None][0])
        assert gap > 100 * limit, method
        assert all(len(t) == MAX_TOKENS for t in refs[method][1])
    # each adapter's greedy answers differ from the base's and from each other adapter's: a runtime that
    # served the base, or another adapter, for a request would fail the token checks below
    answers = [tuple(map(tuple, refs[m][1])) for m in (None, *RUNS)]
    assert len(set(answers)) == len(answers), answers


def test_training_records_the_init_check(smol):
    """Two finite steps per run after a step-0 init check within the default limit (KaSA with
    ``select=activation`` keeps the base)."""
    for method, path in smol["adapters"].items():
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        init = records[0]["init_check"]
        assert records[0]["step"] == 0 and init["limit"] == 0.05
        assert abs(init["increase"]) <= init["limit"], (method, init["increase"])
        steps = [r for r in records if r["step"] > 0 and "loss" in r]
        assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) for r in steps), method
        assert "init check on" in smol["train_output"][method]


def test_fold_equals_adapted_model(smol, tmp_path):
    """The folded checkpoint (the head stays tied to the embeddings) has the adapted model's logits."""
    for method, adapter in smol["adapters"].items():
        out = tmp_path / method
        code, output = invoke("fold", "--base", smol["base"], "--adapter", adapter, "--out", out)
        assert code == 0, output
        folded = load_base(out).eval()
        assert folded.lm_head.weight is folded.model.embed_tokens.weight
        with torch.no_grad():
            got = [folded(input_ids=torch.tensor([ids])).logits[0].float() for ids in smol["ids"]]
        gap, limit = worst(got, smol["refs"][method][0])
        assert gap <= limit, (method, gap, limit)
        del folded


def test_peft_export_equals_adapted_model(smol, tmp_path):
    """Each PEFT export, loaded by PEFT on the unmodified base, has the adapted model's logits."""
    from peft import PeftModel

    peft_model = None
    for method, adapter in smol["adapters"].items():
        code, output = invoke("export", "--target", "peft", "--base", smol["base"], "--adapter", adapter,
                              "--out", tmp_path / method)
        assert code == 0, output
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(load_base(smol["base"]), tmp_path / method, adapter_name=method)
        else:
            peft_model.load_adapter(tmp_path / method, adapter_name=method)
    peft_model.eval()
    for method in smol["adapters"]:
        peft_model.set_adapter(method)
        with torch.no_grad():
            got = [peft_model(input_ids=torch.tensor([ids])).logits[0].float() for ids in smol["ids"]]
        gap, limit = worst(got, smol["refs"][method][0])
        assert gap <= limit, (method, gap, limit)


@pytest.mark.vllm
def test_vllm_serves_every_adapter_in_one_batch(smol):
    """One vLLM engine (``svd-serve verify``: float32, eager, the base and the three adapters in one
    batch of greedy requests on the chat prompts): each request's tokens are the native adapted model's."""
    tmp, exp = smol["tmp"], smol["tmp"] / "vllm"
    code, output = invoke("export", "--target", "vllm", "--base", smol["base"],
                          *sum((["--adapter", a] for a in smol["adapters"].values()), []), "--out", exp)
    assert code == 0, output
    serve = json.loads((exp / "serve.json").read_text())
    assert serve["max_loras"] == len(RUNS)  # every slot taken, base requests in the same batch
    env = scratch_env(tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(smol["base"]),
         "--export", str(exp), *sum((["--prompt", t] for t in smol["texts"]), []),
         "--max-new-tokens", str(MAX_TOKENS),
         "--kv-cache-mib", "64", "--json", str(tmp / "verify.json")],
        env={**env, "SVD_SERVE_LOG": str(tmp / "verify.log")}, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    checks = json.loads((tmp / "verify.json").read_text())["checks"]
    assert set(checks) == {"(base)", *RUNS}
    assert checks["(base)"]["tokens"] == smol["refs"][None][1]
    for method in RUNS:
        assert checks[method]["tokens"] == smol["refs"][method][1], method


@pytest.mark.onnx
def test_onnx_export_equals_adapted_model(smol, tmp_path):
    """One ONNX graph for the three adapters: ONNX Runtime's logits of the chat prompt with each adapter
    active (and none) are the native adapted model's, and onnxruntime-genai's greedy tokens too."""
    from svd_serve.converters.onnx import OnnxLM, check_adapter, load_lora, prefill_feed, run_options, session

    out = tmp_path / "onnx"
    code, output = invoke("export", "--target", "onnx", "--base", smol["base"],
                          *sum((["--adapter", a] for a in smol["adapters"].values()), []), "--out", out,
                          "--dtype", "float32")
    assert code == 0, output
    sess = session(out)
    feeds = [prefill_feed(out, sess, np.array([ids])) for ids in smol["ids"]]
    for method in (None, *RUNS):
        lora = load_lora(check_adapter(out, method)) if method else None
        got = [torch.from_numpy(sess.run(["logits"], feed, run_options(lora))[0][0]) for feed in feeds]
        gap, limit = worst(got, smol["refs"][method][0])
        assert gap <= limit, (method, gap, limit)
    del sess
    lm = OnnxLM.open(out)
    eos = smol["tokenizer"].eos_token_id
    for method in (None, *RUNS):
        for ids, want in zip(smol["ids"], smol["refs"][method][1]):
            # onnxruntime-genai stops at EOS and leaves it out
            assert lm.generate_ids(ids, method, max_new_tokens=MAX_TOKENS) == until_eos(want, eos), method
