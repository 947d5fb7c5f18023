"""``--target onnx`` beyond Llama: each architecture exported with an all-linear adapter, then ONNX
Runtime's logits (base, adapter active, one KV-cache step) against the HF model with the adapter folded."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import MAX_LOGIT_GAP, folded, make_adapter

from svd_serve.converters.onnx import check_adapter, graph_lora_inputs, prefill_feed, session_options
from svd_serve.errors import SvdServeError
from svd_serve.export import export
from svd_serve.model import load_base, resolve_targets
from svd_serve.tiny import build_tiny_model, build_tokenizer

pytestmark = pytest.mark.onnx

# the test model per architecture; Phi-3's builder needs max_position_embeddings == original (no LongRoPE)
MODELS = {
    "mistral": {},
    "qwen2": {},  # biased q/k/v
    "qwen3": {},  # q/k norms
    "gemma": {},
    "phi3": {"original_max_position_embeddings": 256},  # fused qkv_proj and gate_up_proj
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"onnx-{arch}")
    base = build_tiny_model(tmp / "base", arch, **MODELS[arch])
    adapter = make_adapter(base, tmp / "ad", rank=6, targets="all-linear", seed=5)
    report = export("onnx", base, [adapter], tmp / "exp", dtype="float32")
    return {"arch": arch, "base": base, "out": tmp / "exp", "report": report,
            "refs": {None: folded(base), "ad": folded(base, adapter)}}


def test_logits_match_folded_hf(exported):
    out, refs = exported["out"], exported["refs"]
    modules = resolve_targets(load_base(exported["base"]), "all-linear")
    assert sorted(graph_lora_inputs(out)) == sorted(f"{m}.lora_{x}.weight" for m in modules for x in "AB")
    sess = ort.InferenceSession(str(out / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(check_adapter(out, "ad")))
    ids = np.random.default_rng(0).integers(0, refs[None].config.vocab_size, (2, 12))
    feed = prefill_feed(out, sess, ids)
    names = [o.name for o in sess.get_outputs()]
    gaps = {}
    for name in (None, "ad", None):
        opts = ort.RunOptions()
        if name:
            opts.add_active_adapter(lora)
        outs = dict(zip(names, sess.run(None, feed, opts)))
        with torch.no_grad():
            ref = refs[name](input_ids=torch.from_numpy(ids)).logits.numpy()
        gaps[name] = max(gaps.get(name, 0.0), float(np.abs(outs["logits"] - ref).max()))
        if name:
            cache = {k.replace("present", "past_key_values"): v for k, v in outs.items() if k.startswith("present")}
    assert max(gaps.values()) <= MAX_LOGIT_GAP[torch.float32], (exported["arch"], gaps)
    with torch.no_grad():
        assert (refs["ad"](input_ids=torch.from_numpy(ids)).logits
                - refs[None](input_ids=torch.from_numpy(ids)).logits).abs().max() > 1e-2

    # one decode step on the adapter's KV cache
    nxt = np.random.default_rng(1).integers(0, refs[None].config.vocab_size, (2, 1))
    step = {"input_ids": nxt, "attention_mask": np.ones((2, 13), np.int64), **cache}
    opts = ort.RunOptions()
    opts.add_active_adapter(lora)
    logits = sess.run(["logits"], step, opts)[0]
    with torch.no_grad():
        want = refs["ad"](input_ids=torch.from_numpy(np.concatenate([ids, nxt], 1))).logits[:, -1:].numpy()
    assert np.abs(logits - want).max() <= MAX_LOGIT_GAP[torch.float32], exported["arch"]
    assert exported["report"]["adapters"]["ad"]["onnx_max_logit_gap"] <= MAX_LOGIT_GAP[torch.float32]


def test_genai_greedy_matches_hf(exported):
    from svd_serve.converters.onnx import OnnxLM

    lm = OnnxLM.open(exported["out"])
    ids = [int(t) for t in lm.tokenizer.encode("The quick brown fox")]
    outputs = set()
    for name in (None, "ad"):
        model = exported["refs"][name]
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
        assert lm.generate_ids(ids, name, max_new_tokens=8) == want, (exported["arch"], name)
        outputs.add(tuple(want))
    assert len(outputs) == 2


def test_refuses_phi3_the_builder_takes_for_longrope(tiny_model, tmp_path):
    base = tiny_model("phi3")  # max_position_embeddings 256, original 4096, plain RoPE
    adapter = make_adapter(base, tmp_path / "ad", targets="qkv_proj", seed=1)
    with pytest.raises(SvdServeError, match="cannot export Phi3ForCausalLM with max_position_embeddings 256"):
        export("onnx", base, [adapter], tmp_path / "exp", dtype="float32")
    assert not (tmp_path / "exp").exists()


def test_refuses_unsupported_architecture(tmp_path, run_cli):
    import transformers

    tokenizer = build_tokenizer()
    config = transformers.OlmoConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, pad_token_id=tokenizer.pad_token_id)
    base = tmp_path / "olmo"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "ad", seed=1)
    code, text = run_cli("export", "--target", "onnx", "--base", base, "--adapter", adapter,
                         "--out", tmp_path / "exp", "--dtype", "float32")
    assert code == 2 and "error: --target onnx does not support OlmoForCausalLM; supported: " in text, text
    assert not (tmp_path / "exp").exists()
