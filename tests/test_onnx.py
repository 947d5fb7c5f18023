"""ONNX export: one graph, per-request adapters (ORT Multi-LoRA and onnxruntime-genai) against the
folded HF model, and refusal of adapters that do not belong to the graph."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import MAX_LOGIT_GAP, folded, make_adapter, one_error

from svd_serve.converters import onnx as conv
from svd_serve.converters.onnx import OnnxLM, check_adapter, graph_lora_inputs, prefill_feed, session_options
from svd_serve.errors import SvdServeError
from svd_serve.export import export
from svd_serve.model import fingerprint, linear_names, load_base, resolve_targets
from svd_serve.verify import PROMPTS, greedy

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
    assert max(gaps.values()) <= MAX_LOGIT_GAP[torch.float32], gaps
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
    assert np.abs(step - want).max() <= MAX_LOGIT_GAP[torch.float32]


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
    code, text = run_cli("generate", "--export", out, "--adapter", "narrow", "--prompt", PROMPT,
                         "--max-new-tokens", "6")
    assert code == 0, text
    assert text.startswith(lm.generate(PROMPT, "narrow", max_new_tokens=6) + "\n")
    assert "[narrow on cpu]" in text
    assert run_cli("generate", "--onnx", out, "--adapter", "narrow", "--prompt", PROMPT,  # the old name
                   "--max-new-tokens", "6") == (code, text)
    sampled = [run_cli("generate", "--export", out, "--adapter", "wide", "--prompt", PROMPT,
                       "--temperature", "1.5", "--seed", str(s))[1] for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]
    code, text = run_cli("generate", "--export", out, "--adapter", "nope", "--prompt", PROMPT)
    one_error(code, text, "unknown adapter 'nope'")


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, not nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, not inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ([], "Missing option '--export'"),
])
def test_generate_refuses_bad_sampling(args, needle, setup, run_cli):
    export_args = [] if not args else ["--export", setup["out"]]
    code, text = run_cli("generate", *export_args, "--prompt", PROMPT, *args)
    one_error(code, text, needle)


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
    code, text = run_cli("generate", "--export", setup["out"], "--adapter", file, "--prompt", PROMPT)
    one_error(code, text, "another base")


def test_refuses_module_the_graph_lacks(setup, tmp_path):
    export("onnx", setup["base"], [setup["narrow"]], tmp_path / "exp", dtype="float32")
    assert check_adapter(tmp_path / "exp", setup["out"] / "adapters" / "narrow.onnx_adapter")
    with pytest.raises(SvdServeError, match=r"has module model\.layers\.\d+\.\w+\.\w+, which the graph .* lacks"):
        check_adapter(tmp_path / "exp", setup["out"] / "adapters" / "wide.onnx_adapter")


# --- verify --target onnx ------------------------------------------------------------------------------

def test_verify_onnx(setup, run_cli, tmp_path):
    code, out = run_cli("verify", "--target", "onnx", "--base", setup["base"], "--export", setup["out"],
                        "--max-new-tokens", "8", "--json", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and set(report["checks"]) == {"(base)", "wide", "narrow"}
    assert report["runtime"].startswith("ONNX Runtime ") and "CPUExecutionProvider, float32" in report["runtime"]
    assert all(c["max_logprob_gap"] <= 1e-3 and c["prompts_matched"] == 3 for c in report["checks"].values())
    # the tokens are those of the folded HF models (not only of the reference verify built itself)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["base"])
    for name, check in report["checks"].items():
        model = setup["refs"][None if name == "(base)" else name]
        assert check["tokens"] == [greedy(model, tok(p).input_ids, 8)[0] for p in PROMPTS], name
    assert out.splitlines()[-1] == "all 3 match"


def test_verify_onnx_sees_a_runtime_that_ignores_the_adapter(setup, monkeypatch):
    """Had ONNX Runtime run without the adapter (a LoraAdapter freed too early does that), verify fails."""
    from svd_serve.verify import verify

    monkeypatch.setattr(conv, "run_options", lambda lora=None: ort.RunOptions())
    result = verify("onnx", setup["base"], setup["out"], max_new_tokens=4)
    assert result.checks["(base)"]["ok"] and not result.checks["wide"]["ok"] and not result.checks["narrow"]["ok"]
    assert not result.ok and result.lines()[-1] == "MISMATCH: wide, narrow"


def test_verify_onnx_refuses_another_base(setup, run_cli, tmp_path):
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=3)
    code, out = run_cli("verify", "--target", "onnx", "--base", other, "--export", setup["out"])
    one_error(code, out, "was made for another base", str(other))
    code, out = run_cli("verify", "--target", "onnx", "--base", setup["base"], "--export", setup["wide"])
    one_error(code, out, "not an svd-serve ONNX export")


# --- what ONNX Runtime cannot run, float16 on a CPU, a killed export --------------------------------------

@pytest.mark.parametrize("overrides", [{"num_attention_heads": 8},  # head_dim 8
                                       {"hidden_size": 96, "num_attention_heads": 4}])  # head_dim 24
def test_refuses_head_dim_gqa_rejects(overrides, tmp_path, run_cli):
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", "llama", **overrides)
    adapter = make_adapter(base, tmp_path / "ad", rank=2, targets="q_proj", seed=1)
    out = tmp_path / "exp"
    code, text = run_cli("export", "--target", "onnx", "--base", base, "--adapter", adapter, "--out", out,
                         "--dtype", "float32")
    head_dim = 64 // overrides["num_attention_heads"] if "hidden_size" not in overrides else 24
    one_error(code, text, f"cannot export a model with head_dim {head_dim}", "multiples of 16")
    assert not out.exists() and not list(tmp_path.glob(".exp.*"))


def test_float16_export_is_checked_on_the_cpu(setup, tmp_path, run_cli):
    out = tmp_path / "exp16"
    code, text = run_cli("export", "--target", "onnx", "--base", setup["base"], "--adapter", setup["narrow"],
                         "--out", out, "--dtype", "float16")
    assert code == 0, text
    assert "note: the float16 graph is built for CUDA; this machine has none, so ONNX Runtime checked it " \
           "with CPUExecutionProvider" in text
    line = next(l for l in text.splitlines() if l.startswith("narrow:"))
    gap = float(line.rsplit("max |Δ| ", 1)[1])
    assert 0 < gap <= MAX_LOGIT_GAP[torch.float16], line
    code, text = run_cli("verify", "--target", "onnx", "--base", setup["base"], "--export", out, "--max-new-tokens", "4")
    assert code == 0 and "(CPUExecutionProvider, float16)" in text, text
    lm = OnnxLM.open(out)
    assert lm.provider == "cpu" and len(lm.generate_ids([5, 6, 7], "narrow", max_new_tokens=3)) == 3


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                stat = open(f"/proc/{proc}/stat").read()
                cmd = open(f"/proc/{proc}/cmdline").read().replace("\0", " ")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(proc), cmd))
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_export_leaves_no_builder_and_no_scratch_outside(setup, tmp_path):
    """SIGKILL during the model builder: the builder dies too, the system temp dir stays clean, and
    the only leftover is the temporary sibling (which the next run on that --out removes)."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    out = tmp_path / "exp"
    env = {**os.environ, "TMPDIR": str(systmp), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "svd_serve", "export", "--target", "onnx", "--base", str(setup["base"]),
                             "--adapter", str(setup["narrow"]), "--out", str(out), "--dtype", "float32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    builder, deadline = None, time.monotonic() + 300
    while builder is None and proc.poll() is None and time.monotonic() < deadline:
        builder = next((p for p, cmd in _children(proc.pid) if "onnxruntime_genai.models.builder" in cmd), None)
        time.sleep(0.02)
    assert builder is not None, "the builder never started"
    os.kill(builder, signal.SIGSTOP)  # it cannot finish on its own now: only its parent's death ends it
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while _alive(builder) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(builder)
    finally:
        if _alive(builder):
            os.kill(builder, signal.SIGKILL)
    # nothing in the system temp dir but the session-id file ONNX Runtime writes on import in any run
    assert {p.name for p in systmp.iterdir()} <= {".ses"}
    (temp,) = tmp_path.glob(".exp.tmp-*")
    assert (temp / ".build").is_dir() and not out.exists()
