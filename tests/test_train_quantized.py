"""Training on a quantized base (``train --quantize``, QLoRA): the init is the full-precision init, the
trained model is exactly the quantized base plus the adapter, ΔW and the fingerprint are the original
base's (so the vLLM export verifies against the original base), resume, and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import MAX_LOGIT_GAP, adapter_tensors, max_diff, one_error, scratch_env
from svd_serve.adapter import AdapterSet
from svd_serve.model import fingerprint, load_base
from svd_serve.weights import Weights

pytest.importorskip("bitsandbytes")
import bitsandbytes as bnb  # noqa: E402

STEPS = ["--steps", 2, "--batch-size", 4, "--lr", 1e-2, "--no-progress"]
# KaSA's default selection reads calibration inputs, which come from the model trained (the quantized
# one); select=weight makes its init a function of W alone
OPTIONS = {"kasa": ["-o", "select=weight"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama vLLM can load (CPU attention needs head_dim ≥ 32)."""
    from svd_serve.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qbase") / "base", "llama", head_dim=32)


@pytest.fixture(scope="module")
def runs(base, qa_data, tmp_path_factory, run_cli):
    """``runs(method, quantize)`` → the adapter trained by the CLI (once per pair)."""
    tmp = tmp_path_factory.mktemp("qruns")
    done = {}

    def get(method: str, quantize: str | None = "nf4"):
        key = (method, quantize)
        if key not in done:
            out = tmp / f"{method}-{quantize}"
            code, output = run_cli("train", "--base", base, "--data", qa_data, "--method", method,
                                   *(["--quantize", quantize] if quantize else []), *OPTIONS.get(method, []),
                                   *STEPS, "--out", out)
            assert code == 0, output
            done[key] = (out, output)
        return done[key]

    return get


def test_init_is_the_full_precision_init(base, runs):
    """The frozen tensors are the init (PiSSA's principal factors, KaSA's dropped components): those
    of an nf4 run equal those of a float32 run bit for bit; the fingerprint is the original base's."""
    targets = None
    for method, frozen in (("pissa", ("A0", "B0")), ("kasa", ("dropped_us", "dropped_vh"))):
        (q, q_out), (f, _) = runs(method), runs(method, None)
        tq, tf = adapter_tensors(q), adapter_tensors(f)
        keys = [k for k in tq if k.rsplit(".", 1)[1] in frozen]
        assert len(keys) == 2 * 4  # 2 layers × q_proj, v_proj
        for k in keys:
            assert torch.equal(tq[k], tf[k]), k
        config = json.loads((q / "svd_adapter.json").read_text())
        targets = list(config["targets"])
        assert config["base_fingerprint"] == json.loads((f / "svd_adapter.json").read_text())["base_fingerprint"]
        assert "(nf4 base)" in q_out
        init = json.loads((q / "metrics.jsonl").read_text().splitlines()[0])["init_check"]
        assert init["quantized"] == "nf4"
    assert config["base_fingerprint"] == fingerprint(load_base(base), targets) == Weights(base).fingerprint(targets)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_lora_trains_on_every_quantization(runs, quant):
    out, output = runs("lora", quant)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and records[0]["init_check"]["quantized"] == quant
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records[1:])
    assert all(v.abs().max() > 0 for k, v in adapter_tensors(out).items() if k.endswith(".B"))


def _dequantized(module) -> torch.Tensor:
    """A bitsandbytes Linear's weight as it computes with it: 4-bit blocks dequantized by bitsandbytes,
    int8 rows times their absmax / 127."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # (moved there by a forward)
    return module.weight.data.float() * scb.float()[:, None] / 127


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_trained_model_is_quantized_base_plus_adapter(base, qa_data, tmp_path, quant):
    """The model the run trained computes ``(deq(Q(W)) + ΔW) x``: its logits equal those of a float32
    model holding every dequantized weight plus the adapter's exact ΔW (PiSSA: its frozen principal
    part is a separate low-rank product, not absorbed)."""
    from svd_serve.training import TrainConfig, fit, start

    run = start(TrainConfig(base=str(base), data=str(qa_data), out=str(tmp_path / "o"), method="pissa",
                            quantize=quant, steps=2, batch_size=4, lr=1e-2, progress=False))
    fit(run)
    ref = load_base(base)
    deltas = {name: layer.delta() for name, layer in run.adapters.items()}
    n_quantized = 0
    with torch.no_grad():
        for name, module in run.model.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                w = _dequantized(module)
                n = name.removesuffix(".base")
                if n in deltas:
                    a, b = deltas[n]
                    w = w + b @ a
                ref.get_submodule(n).weight.copy_(w)
                n_quantized += 1
    assert n_quantized == 2 * 7 and len(deltas) == 4  # every Linear but the head; the targets
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 88, 3, 11, 64]])
    run.model.eval()
    with torch.no_grad():
        got, want = run.model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (got - want).abs().max() <= MAX_LOGIT_GAP[torch.float32]
    # ... and the adapter is really there: the quantized base alone is another model
    for name, layer in run.adapters.items():
        assert float(layer.delta().B.abs().max()) > 0


def test_resume_is_exact(base, qa_data, tmp_path, run_cli, monkeypatch):
    """An nf4 run stopped after its step-2 checkpoint and resumed ends where the uninterrupted run ends."""
    import svd_serve.training.checkpoint as ckpt

    args = ["train", "--base", base, "--data", qa_data, "--method", "pissa", "--quantize", "nf4", "--steps", 4,
            "--batch-size", 4, "--lr", 1e-2, "--save-every", 2, "--no-progress"]
    code, output = run_cli(*args, "--out", tmp_path / "ref")
    assert code == 0, output

    save = ckpt.save

    def save_then_stop(out, adapters, state, keep):  # as Ctrl-C right after the checkpoint
        save(out, adapters, state, keep)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save", save_then_stop)
    assert run_cli(*args, "--out", tmp_path / "cut")[0] == 130
    monkeypatch.setattr(ckpt, "save", save)
    assert not (tmp_path / "cut" / "svd_adapter.json").exists()
    code, output = run_cli(*args, "--out", tmp_path / "cut", "--resume")
    assert code == 0 and "resumed from" in output, output
    assert max_diff(tmp_path / "ref", tmp_path / "cut") == 0


def test_export_serves_the_original_base_plus_delta(base, runs, tmp_path):
    """The nf4-trained PiSSA adapter exports as exact LoRA against the original base, and vLLM serving
    the original base with it matches the folded model (`svd-serve verify --target vllm`)."""
    from svd_serve.export import export

    adapter = runs("pissa")[0]
    export("vllm", base, [adapter], tmp_path / "exp")
    exp = tmp_path / "exp" / adapter.name
    cfg = json.loads((exp / "adapter_config.json").read_text())
    factors = load_file(exp / "adapter_model.safetensors")
    layers = AdapterSet.load(adapter, Weights(base))
    for name, layer in layers.items():
        a = factors[f"base_model.model.{name}.lora_A.weight"].double()
        b = factors[f"base_model.model.{name}.lora_B.weight"].double()
        da, db = layer.delta()
        want = db.double() @ da.double()
        got = b @ a * (cfg["lora_alpha"] / cfg["r"])
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name
    env = scratch_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(base), "--export",
         str(tmp_path / "exp"), "--max-new-tokens", "8", "--kv-cache-mib", "64"],
        env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0", "SVD_SERVE_LOG": str(tmp_path / "verify.log")},
        capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "all 2 match" and any(line.split()[:1] == [adapter.name] for line in lines), out.stdout  # base, adapter


# --- refusals ----------------------------------------------------------------------------------------
def test_refusals(base, qa_data, tmp_path, run_cli, monkeypatch):
    args = ["train", "--base", base, "--data", qa_data, "--steps", 1, "--no-progress"]
    one_error(*run_cli(*args, "--out", tmp_path / "a", "--quantize", "nf3"), "--quantize", "'nf3'", "nf4")
    one_error(*run_cli(*args, "--out", tmp_path / "b", "--quantize", "nf4", "--method", "osft"),
              "--quantize", "osft", "full-rank")
    quantized = tmp_path / "quantized"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    one_error(*run_cli("train", "--base", quantized, "--data", qa_data, "--out", tmp_path / "c", "--quantize",
                       "nf4"), "already quantized", "bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    one_error(*run_cli(*args, "--out", tmp_path / "d", "--quantize", "int8"), "bitsandbytes package")
    assert not any((tmp_path / d).exists() for d in "abcd")
