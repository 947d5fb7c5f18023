"""The target protocol, `svd-serve verify` (shared parts and --target peft), and PEFT's scale in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_adapter, one_error

from svd_serve.adapter import AdapterSet
from svd_serve.converters import TARGETS, ExportedAdapter, ExportJob, Target, get_target
from svd_serve.converters.peft import RECORD, read_lora, scale
from svd_serve.errors import SvdServeError
from svd_serve.model import load_base


@pytest.fixture(scope="module")
def peft_export(tiny_model, tmp_path_factory):
    from svd_serve.export import export

    tmp = tmp_path_factory.mktemp("peft-verify")
    base = tiny_model("llama")
    adapter = make_adapter(base, tmp / "kasa", "kasa", targets="all-linear", scale=0.1)
    export("peft", base, [adapter], tmp / "peft")
    return {"base": base, "adapter": adapter, "out": tmp / "peft", "tmp": tmp}


# --- the protocol ------------------------------------------------------------------------------------

def test_registry_holds_targets():
    for name in TARGETS:
        target = get_target(name)
        assert isinstance(target, Target) and target.name == name and target.help
    assert [n for n in TARGETS if get_target(n).has_runtime] == ["onnx"]
    with pytest.raises(SvdServeError, match="unknown target 'nope'; choose one of: peft, vllm, onnx"):
        get_target("nope")
    with pytest.raises(SvdServeError, match="no runtime for --target vllm; generate runs: onnx"):
        get_target("vllm").open(Path("x"))


def test_a_new_target_is_one_file_and_one_line(tiny_model, tmp_path, monkeypatch):
    """A target written in one module and registered in TARGETS exports through svd_serve.export."""
    from svd_serve.export import export

    (tmp_path / "npz_target.py").write_text(
        "import numpy as np\n"
        "from svd_serve.converters import Target\n"
        "from svd_serve.files import atomic_dir\n"
        "class NpzTarget(Target):\n"
        "    name = 'npz'\n"
        "    help = 'factors in one .npz'\n"
        "    def export(self, job, out):\n"
        "        with atomic_dir(out) as tmp:\n"
        "            a, = job.adapters\n"
        "            np.savez(tmp / 'f.npz', **{m + '.A': t.numpy() for m, t in a.A.items()},\n"
        "                     **{m + '.B': t.numpy() for m, t in a.B.items()})\n"
        "        return {a.name: {'path': str(out)}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(TARGETS, "npz", "npz_target:NpzTarget")
    base = tiny_model("llama")
    adapter = make_adapter(base, tmp_path / "lora", targets="q_proj", scale=0.1)
    report = export("npz", base, [adapter], tmp_path / "out")
    import numpy as np

    saved = np.load(tmp_path / "out" / "f.npz")
    deltas = AdapterSet.load(adapter).deltas()
    assert report["adapters"]["lora"]["path"] == str(tmp_path / "out")
    for m, d in deltas.items():
        assert torch.equal(torch.from_numpy(saved[m + ".B"]) @ torch.from_numpy(saved[m + ".A"]), d.B @ d.A)


def test_export_job_carries_factors_only():
    """Converters get factors: the job has no model, and its adapters are plain tensors."""
    assert "model" not in ExportJob.__dataclass_fields__
    assert {f for f in ExportedAdapter.__dataclass_fields__} == {"name", "path", "config", "A", "B", "rel_error",
                                                                "errors", "served"}


# --- PEFT's scale, in one function ---------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {"rank_pattern": {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 3}, "alpha_pattern": {"v_proj": 5, "o_proj": 7}},
    {"use_rslora": True},
])
def test_scale_and_read_lora_agree_with_peft(extra, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = load_base(tiny_model("llama"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    deltas = read_lora(tmp_path / "p")
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(deltas) and len(layers) == 6
    scales = set()
    for name, layer in layers.items():
        assert scale(config, name) == pytest.approx(layer.scaling["default"], rel=1e-12), name
        torch.testing.assert_close(deltas[name].dense(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        scales.add(round(scale(config, name), 9))
    assert len(scales) > (1 if "rank_pattern" in extra else 0)  # the patterns really differ per module


# --- verify, shared parts ------------------------------------------------------------------------------

def test_engine_failure_is_one_line_naming_the_log(tmp_path, monkeypatch, capfd):
    """What a runtime prints goes to the log; its failure becomes one error naming the root cause."""
    from svd_serve.verify import engine

    log = tmp_path / "svd-serve.log"
    monkeypatch.setenv("SVD_SERVE_LOG", str(log))
    noisy = ("import sys\nprint('INFO starting engine')\n"
             "print('Traceback (most recent call last):\\n  File x\\nRuntimeError: Unsupported head_dim=16', file=sys.stderr)\n"
             "print('RuntimeError: Worker failed, see above', file=sys.stderr)")
    with pytest.raises(SvdServeError) as e:
        with engine("the test engine"):
            subprocess.run([sys.executable, "-c", noisy], check=True)
            raise RuntimeError("Engine core initialization failed. See root cause above.")
    assert str(e.value) == f"the test engine failed: RuntimeError: Unsupported head_dim=16; its output is in {log}"
    out, err = capfd.readouterr()
    assert out == err == ""
    assert "INFO starting engine" in log.read_text()
    # an SvdServeError raised inside passes through unchanged
    with pytest.raises(SvdServeError, match="^refused$"):
        with engine("the test engine"):
            raise SvdServeError("refused")


def test_compare_flags_token_and_logprob_mismatches():
    from svd_serve.verify import compare

    ref = [([1, 2, 3], [-0.1, -0.2, -0.3])]
    assert compare(ref, [([1, 2, 3], [-0.1, -0.2, -0.3])], 1e-3)["ok"]
    assert not compare(ref, [([1, 2, 4], [-0.1, -0.2, -0.3])], 1e-3)["ok"]
    bad = compare(ref, [([1, 2, 3], [-0.1, -0.25, -0.3])], 1e-3)
    assert bad["tokens_match"] and not bad["ok"] and bad["max_logprob_gap"] == pytest.approx(0.05)

    # a divergence at a near tie of the reference passes; at a clear choice, or to a token outside the
    # reference's best, it does not; and the tokens after the divergence are not compared
    tops = [{1: -0.1, 7: -3.0}, {2: -0.2, 4: -0.2005, 9: -2.0}, {3: -0.3, 8: -0.9}]
    ref = [([1, 2, 3], [-0.1, -0.2, -0.3], tops)]
    tie = compare(ref, [([1, 4, 6], [-0.1, -0.2, -5.0])], 1e-3)
    assert tie["ok"] and not tie["tokens_match"] and tie["near_ties"] == 1 and tie["max_logprob_gap"] == 0.0
    assert not compare(ref, [([1, 9, 3], [-0.1, -0.2, -0.3])], 1e-3)["ok"]  # 1.8 below the best
    assert not compare(ref, [([1, 5, 3], [-0.1, -0.2, -0.3])], 1e-3)["ok"]  # not among the best
    assert not compare(ref, [([1, 4, 6], [-0.15, -0.2, -5.0])], 1e-3)["ok"]  # (the prefix still counts)


@pytest.mark.parametrize("args, needles", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
    (["--tol", "nan"], ["--tol must be a finite number"]),
    (["--target", "nope"], ["'nope' is not one of"]),
])
def test_verify_bad_options(args, needles, peft_export, run_cli):
    code, out = run_cli("verify", "--target", "peft", "--base", peft_export["base"], "--export", peft_export["out"], *args)
    one_error(code, out, *needles)


def test_verify_missing_base_is_refused_without_a_hub(peft_export, run_cli, tmp_path):
    code, out = run_cli("verify", "--target", "peft", "--base", tmp_path / "nope", "--export", peft_export["out"])
    one_error(code, out, "base model directory not found", str(tmp_path / "nope"))
    code, out = run_cli("verify", "--target", "peft", "--base", "org/model", "--export", peft_export["out"])
    one_error(code, out, "org/model is neither a local directory nor a model in the Hugging Face cache",
              "offline mode is on")


# --- verify --target peft --------------------------------------------------------------------------------

def test_verify_peft(peft_export, run_cli, tmp_path):
    code, out = run_cli("verify", "--target", "peft", "--base", peft_export["base"], "--export", peft_export["out"],
                        "--max-new-tokens", "6", "--json", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["target"] == "peft" and report["max_new_tokens"] == 6
    assert set(report["checks"]) == {"(base)", "kasa"}
    assert all(c["ok"] and c["max_logprob_gap"] <= 1e-3 for c in report["checks"].values())
    # the adapter changes the tokens, so equal tokens are not the base twice
    assert report["checks"]["kasa"]["tokens"] != report["checks"]["(base)"]["tokens"]
    lines = out.splitlines()
    assert lines[-1] == "all 2 match" and any(l.startswith("verify --target peft: PEFT ") for l in lines)
    assert any(l.startswith("kasa ") and l.endswith("ok") and "3/3 match" in l for l in lines)
    # the old option name still works
    code, out = run_cli("verify", "--target", "peft", "--base", peft_export["base"], "--export", peft_export["out"],
                        "--max-tokens", "2")
    assert code == 0 and "3 prompts x 2 new tokens" in out, out


def test_verify_peft_finds_a_reader_disagreement(peft_export, run_cli, tmp_path):
    """target_modules naming fewer modules than the tensors: PEFT skips the rest, svd-serve's reader
    does not, and verify says so (exit 1)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(peft_export["out"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    code, out = run_cli("verify", "--target", "peft", "--base", peft_export["base"], "--export", bad)
    assert code == 1 and out.splitlines()[-1] == "MISMATCH: kasa", out


def test_verify_peft_refuses_another_base(peft_export, run_cli, tmp_path):
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=5)
    code, out = run_cli("verify", "--target", "peft", "--base", other, "--export", peft_export["out"])
    one_error(code, out, "adapter kasa was made for another base", str(other))


def test_verify_peft_needs_the_export_record(peft_export, run_cli, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(peft_export["out"], bare)
    (bare / RECORD).unlink()
    code, out = run_cli("verify", "--target", "peft", "--base", peft_export["base"], "--export", bare)
    one_error(code, out, f"has no {RECORD}")


def test_peft_export_of_several_adapters_is_refused(peft_export, run_cli, tmp_path):
    second = make_adapter(peft_export["base"], tmp_path / "second", targets="q_proj", scale=0.1)
    out = tmp_path / "out"
    code, text = run_cli("export", "--target", "peft", "--base", peft_export["base"], "--adapter",
                         peft_export["adapter"], "--adapter", second, "--out", out)
    one_error(code, text, "one adapter per directory")
    assert not out.exists()
