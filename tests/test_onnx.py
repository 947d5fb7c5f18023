"""ONNX export: one graph, per-request adapters (ORT Multi-LoRA and onnxruntime-genai) against the
folded HF model, and refusal of adapters that do not belong to the graph."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import TOLERANCE, folded, make_adapter

from svd_serve.converters.onnx import check_adapter, graph_lora_inputs, prefill_feed, session_options
from svd_serve.errors import SvdServeError
from svd_serve.export import export
from svd_serve.generate import OnnxLM
from svd_serve.model import fingerprint, linear_names, load_base, resolve_targets

pytestmark = pytest.mark.onnx

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory, run_cli):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("onnx")
    wide = make_adapter(base, tmp / "wide", rank=8, targets="all-linear", seed=1)
    narrow = make_adapter(base, tmp / "narrow", seed=2)
    code, out = run_cli("export", "--target", "onnx", "--base", base, "--adapter", wide,
                        "--adapter", narrow, "--out", tmp / "exp", "--dtype", "float32")
    assert code == 0, out
    refs = {None: folded(base), "wide": folded(base, wide), "narrow": folded(base, narrow)}
    return {"base": base, "tmp": tmp, "out": tmp / "exp", "wide": wide, "narrow": narrow, "refs": refs}


def test_manifest_and_graph(setup):
    out = setup["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    model = load_base(setup["base"])
    assert manifest["base_fingerprint"] == fingerprint(model, linear_names(model))
    assert manifest["dtype"] == "float32" and manifest["provider"] == "cpu"
    wide, narrow = manifest["adapters"]["wide"], manifest["adapters"]["narrow"]
    assert (wide["rank"], narrow["rank"]) == (8, 4)
    assert sorted(narrow["modules"]) == sorted(resolve_targets(model, "q_proj,v_proj"))
    assert sorted(wide["modules"]) == sorted(resolve_targets(model, "all-linear"))
    for name in ("wide", "narrow"):
        assert (out / "adapters" / f"{name}.onnx_adapter").is_file()
    # LoRA inputs for the union of modules, each with its own rank symbol and a zero-rank default
    inputs = graph_lora_inputs(out)
    assert sorted(inputs) == sorted(f"{m}.lora_{x}.weight" for m in wide["modules"] for x in "AB")
    ranks = [shape[1] for name, shape in inputs.items() if name.endswith("lora_A.weight")]
    assert all(isinstance(r, str) for r in ranks) and len(set(ranks)) == len(ranks)
    for name, shape in inputs.items():
        if name.endswith("lora_B.weight"):
            assert shape[0] == inputs[name.replace("lora_B", "lora_A")][1]
    params = ort.AdapterFormat.read_adapter(str(out / "adapters" / "narrow.onnx_adapter")).get_parameters()
    assert len(params) == 2 * len(narrow["modules"])
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_one_session_switches_adapters(setup):
    """Base, two ranks, partial coverage, base again: every run equals the folded HF model."""
    out, refs = setup["out"], setup["refs"]
    sess = ort.InferenceSession(str(out / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    loras = {}
    for name in ("wide", "narrow"):
        loras[name] = ort.LoraAdapter()
        loras[name].Load(str(check_adapter(out, name)))
    ids = np.random.default_rng(0).integers(0, refs[None].config.vocab_size, (2, 12))
    feed = prefill_feed(out, sess, ids)
    gaps = {}
    for name in (None, "wide", None, "narrow", "wide", None, "narrow"):
        opts = ort.RunOptions()
        if name:
            opts.add_active_adapter(loras[name])
        logits = sess.run(["logits"], feed, opts)[0]
        with torch.no_grad():
            ref = refs[name](input_ids=torch.from_numpy(ids)).logits.numpy()
        gaps[name] = max(gaps.get(name, 0.0), float(np.abs(logits - ref).max()))
    assert max(gaps.values()) <= TOLERANCE[torch.float32], gaps
    # the adapters change the output, so the comparison above can fail
    with torch.no_grad():
        base_logits = refs[None](input_ids=torch.from_numpy(ids)).logits
        for name in ("wide", "narrow"):
            assert (refs[name](input_ids=torch.from_numpy(ids)).logits - base_logits).abs().max() > 1e-2


def test_kv_cache_decode_step_with_adapter(setup):
    out, ref = setup["out"], setup["refs"]["narrow"]
    sess = ort.InferenceSession(str(out / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(check_adapter(out, "narrow")))
    opts = ort.RunOptions()
    opts.add_active_adapter(lora)
    ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, (1, 9))
    names = [o.name for o in sess.get_outputs()]
    first = dict(zip(names, sess.run(None, prefill_feed(out, sess, ids[:, :8]), opts)))
    feed = {"input_ids": ids[:, 8:], "attention_mask": np.ones((1, 9), np.int64)}
    feed.update({k.replace("present", "past_key_values"): v for k, v in first.items() if k.startswith("present")})
    step = sess.run(["logits"], feed, opts)[0]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits[:, 8:].numpy()
    assert np.abs(step - want).max() <= TOLERANCE[torch.float32]


def test_genai_greedy_matches_hf(setup):
    from transformers import AutoTokenizer

    lm = OnnxLM.open(setup["out"])
    ids = AutoTokenizer.from_pretrained(setup["base"])(PROMPT).input_ids
    assert [int(t) for t in lm.tokenizer.encode(PROMPT)] == ids
    outputs = {}
    for name in (None, "wide", "narrow", None):
        got = lm.generate_ids(ids, name, max_new_tokens=12)
        model = setup["refs"][name]
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
        assert got == want, name
        outputs[name] = got
    assert len({tuple(v) for v in outputs.values()}) == 3  # each adapter really changes the output


def test_generate_cli(setup, run_cli):
    out = setup["out"]
    lm = OnnxLM.open(out)
    code, text = run_cli("generate", "--onnx", out, "--adapter", "narrow", "--prompt", PROMPT,
                         "--max-new-tokens", "6")
    assert code == 0, text
    assert text.startswith(lm.generate(PROMPT, "narrow", max_new_tokens=6) + "\n")
    assert "[narrow on cpu]" in text
    sampled = [run_cli("generate", "--onnx", out, "--adapter", "wide", "--prompt", PROMPT,
                       "--temperature", "1.5", "--seed", str(s))[1] for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]
    code, text = run_cli("generate", "--onnx", out, "--adapter", "nope", "--prompt", PROMPT)
    assert code == 2 and "unknown adapter 'nope'" in text


def test_refuses_adapter_of_another_base(setup, tmp_path, run_cli):
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-base", "llama", seed=1)
    foreign = make_adapter(other, tmp_path / "foreign", seed=3)
    export("onnx", other, [foreign], tmp_path / "exp", dtype="float32")
    file = tmp_path / "exp" / "adapters" / "foreign.onnx_adapter"
    with pytest.raises(SvdServeError, match="exported for another base"):
        check_adapter(setup["out"], file)
    lm = OnnxLM.open(setup["out"])
    with pytest.raises(SvdServeError, match="exported for another base"):
        lm.generate_ids([5, 6, 7], file, max_new_tokens=2)
    code, text = run_cli("generate", "--onnx", setup["out"], "--adapter", file, "--prompt", PROMPT)
    assert code == 2 and "another base" in text


def test_refuses_module_the_graph_lacks(setup, tmp_path):
    export("onnx", setup["base"], [setup["narrow"]], tmp_path / "exp", dtype="float32")
    assert check_adapter(tmp_path / "exp", setup["out"] / "adapters" / "narrow.onnx_adapter")
    with pytest.raises(SvdServeError, match=r"has module model\.layers\.\d+\.\w+\.\w+, which the graph .* lacks"):
        check_adapter(tmp_path / "exp", setup["out"] / "adapters" / "wide.onnx_adapter")
