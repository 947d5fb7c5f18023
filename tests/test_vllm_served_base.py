"""``verify --target vllm --served-base``: exports served by vLLM on a W4A16 copy of SmolLM2 against the
full-precision adapted model, in ONE engine run: a plain export (two adapters), an export written
against the served base (``export --served-base``), and a wrong export (one adapter's record over
another's factors) in one batch. The judging rules are also checked on synthetic distributions.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_adapter, scratch_env

from svd_serve.verification import BASE
from svd_serve.verify_served import EFFECT_SHARE, MAX_NOISE, NOISE_FLOOR, NOISE_RATIO, judge, mean_kl

MAX_TOKENS = 4
PROMPTS = ["Paris is the capital of", "Question: what is two plus two? Answer:"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from svd_serve.export import export
    from svd_serve.quant import quantize_checkpoint
    from svd_serve.realmodel import smollm2

    tmp = tmp_path_factory.mktemp("served")
    base = smollm2()
    w4 = quantize_checkpoint(base, tmp / "w4a16", "W4A16")
    lora = make_adapter(base, tmp / "ad" / "lora", "lora", rank=4, targets="q_proj,v_proj", seed=1, scale=0.1)
    other = make_adapter(base, tmp / "ad" / "other", "lora", rank=4, targets="q_proj,v_proj", seed=2, scale=0.1)
    export("vllm", base, [lora, other], tmp / "plain")
    calib = tmp / "calib.jsonl"
    rows = (Path(__file__).parent / "data" / "chat-calib.jsonl").read_text().splitlines()[:8]
    calib.write_text("\n".join(rows) + "\n")
    export("vllm", base, [lora], tmp / "aware", served_base=w4, calib_data=calib)
    # the wrong mapping: lora's record (source, hash) over other's factors
    wrong = tmp / "wrong"
    shutil.copytree(tmp / "plain" / "other", wrong / "lora")
    shutil.copy(tmp / "plain" / "lora" / "svd_serve_export.json", wrong / "lora" / "svd_serve_export.json")
    serve = json.loads((tmp / "plain" / "serve.json").read_text())
    serve["adapters"] = {"lora": {**serve["adapters"]["lora"], "path": str(wrong / "lora")}}
    (wrong / "serve.json").write_text(json.dumps(serve))

    args = [sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(base),
            "--served-base", str(w4), "--export", str(tmp / "plain"), "--export", str(tmp / "aware"),
            "--export", str(wrong), "--max-new-tokens", str(MAX_TOKENS), "--kv-cache-mib", "64",
            "--json", str(tmp / "v.json"), *sum((["--prompt", p] for p in PROMPTS), [])]
    out = subprocess.run(args, env={**scratch_env(tmp), "SVD_SERVE_LOG": str(tmp / "verify.log")},
                         capture_output=True, text=True, timeout=600)
    report = json.loads((tmp / "v.json").read_text()) if out.returncode in (0, 1) else None
    return {"code": out.returncode, "stdout": out.stdout, "output": out.stdout + out.stderr[-3000:],
            "report": report}


@pytest.mark.vllm
def test_served_base_rows(served):
    """Exit 1 for the wrong mapping alone; every correct row is served exactly (against the dequantized
    base + its written factors, within the served base's own rounding); the quantized base's distance
    from full precision is > 0 and finite; the adapters are applied; the aware export is closer to the
    full-precision adapted model than the plain one."""
    assert served["code"] == 1, served["output"]
    report = served["report"]
    checks = report["checks"]
    assert list(checks) == [BASE, "plain/lora", "plain/other", "aware/lora", "wrong/lora"], served["output"]
    assert served["stdout"].splitlines()[-1] == "OUTSIDE TOLERANCE: wrong/lora", served["output"]
    base = checks[BASE]
    assert 0 < base["kl"] < math.inf and base["positions"] == len(PROMPTS) * MAX_TOKENS
    assert 0 < base["exact"] <= MAX_NOISE and base["exact"] < base["kl"] / 10, base  # rounding ≪ quantization
    for name in ("plain/lora", "plain/other", "aware/lora"):
        c = checks[name]
        assert c["ok"] and c["result"] == "ok", (name, c)
        noise = NOISE_RATIO * base["exact"] + NOISE_FLOOR
        assert c["exact"] <= c["allowed"] == pytest.approx(noise + EFFECT_SHARE * c["effect"]), (name, c)
        assert c["effect"] > 100 * noise, (name, c)  # served adapter ≠ served base, far above rounding
        assert 0 < c["base_kl"] < math.inf
    plain, aware = checks["plain/lora"], checks["aware/lora"]
    assert plain["tokens"] == aware["tokens"] == checks["wrong/lora"]["tokens"]  # one reference: lora's exact ΔW
    assert plain["base_kl"] == aware["base_kl"]  # the same contexts
    assert aware["kl"] < plain["kl"], (aware, plain)
    wrong = checks["wrong/lora"]
    assert wrong["result"] == "NOT ITS ADAPTER'S ΔW" and not wrong["ok"], wrong


def test_judge_rules():
    """The rule on synthetic distributions: exact within the served base's noise, outside, not
    applied, and a served base that is not the checkpoint's model."""
    g = torch.Generator().manual_seed(0)

    def logsm(logits):
        return [torch.log_softmax(logits, -1)]

    base_logits = torch.randn(6, 50, generator=g)
    noise = torch.randn(6, 50, generator=g) * 0.01
    move = torch.randn(6, 50, generator=g) * 2.0
    quant = torch.randn(6, 50, generator=g) * 0.5
    ref = {BASE: {"model": logsm(base_logits), "base": logsm(base_logits)},
           **{n: {"model": logsm(base_logits + move), "base": logsm(base_logits)} for n in ("good", "ignored", "far")}}
    exact = {BASE: logsm(base_logits + quant), **{n: logsm(base_logits + quant + move) for n in ("good", "ignored", "far")}}
    srv_base = logsm(base_logits + quant + noise)
    got = {BASE: {"model": srv_base, "base": srv_base},
           "good": {"model": logsm(base_logits + quant + move + noise), "base": srv_base},
           "ignored": {"model": srv_base, "base": srv_base},
           "far": {"model": logsm(base_logits + quant - move), "base": srv_base}}
    tokens = {n: [[0] * 6] for n in got}
    checks, noise_kl = judge(tokens, ref, got, exact)
    assert noise_kl == pytest.approx(mean_kl(exact[BASE], srv_base)) and 0 < noise_kl < 1e-3
    assert checks[BASE]["result"] == "tolerance"
    assert checks[BASE]["kl"] == pytest.approx(mean_kl(ref[BASE]["model"], srv_base))
    good = checks["good"]
    assert good["result"] == "ok" and good["allowed"] == NOISE_RATIO * noise_kl + NOISE_FLOOR + EFFECT_SHARE * good["effect"]
    assert checks["ignored"]["result"] == "NOT APPLIED" and checks["ignored"]["effect"] == 0.0
    assert checks["far"]["result"] == "OUTSIDE" and not checks["far"]["ok"]
    far_base = {**got, BASE: {"model": logsm(base_logits + quant + move), "base": srv_base}}
    checks, _ = judge(tokens, ref, far_base, exact)
    assert not checks[BASE]["ok"] and checks[BASE]["result"].startswith("NOT THE CHECKPOINT'S MODEL")


def test_mean_kl_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]], dtype=torch.float64))
    assert mean_kl([p], [q]) == pytest.approx((math.log(2) + math.log(2)) / 2, abs=1e-12)


def test_served_base_input_errors(run_cli, tmp_path):
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "b", "llama", head_dim=32)
    code, out = run_cli("verify", "--target", "vllm", "--base", base, "--export", tmp_path, "--export", tmp_path / "x")
    assert code == 2 and "several only with --served-base" in out, out
    code, out = run_cli("verify", "--target", "vllm", "--base", base, "--export", tmp_path, "--served-base", base,
                        "--tol", "0.1")
    assert code == 2 and "--tol does not apply to --served-base" in out, out
    code, out = run_cli("verify", "--target", "onnx", "--base", base, "--export", tmp_path, "--served-base", base)
    assert code == 2 and "cannot build an int4 graph of a quantized checkpoint" in out, out
