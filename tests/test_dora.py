"""``import --from peft`` of DoRA adapters (the best rank-K LoRA of DoRA's full-rank ΔW) and of a LoRA on
an untied output head, against PEFT's own forward and, served, against vLLM's offline engine."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import one_error, scratch_env, write_jsonl
from svd_serve.adapter import AdapterSet
from svd_serve.converters import vllm as conv
from svd_serve.errors import SvdServeError
from svd_serve.importer import dora_delta, import_peft, read_peft, scaling
from svd_serve.model import load_base
from svd_serve.tiny import CORPUS

R = 4
DORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def peft_adapter(base: Path, out: Path, targets: list[str], dora: bool, seed: int):
    """A PEFT LoRA (or DoRA) on ``base`` with random B and, for DoRA, magnitudes off their init: saved
    to ``out``; returns the PEFT model (eval, float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, use_dora=dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():  # (PEFT says it saves the head's base layer too)
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from svd_serve.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("dora")
    base = build_tiny_model(tmp / "base", "llama", head_dim=32)  # untied head; vLLM's CPU attention: head_dim ≥ 32
    dora = peft_adapter(base, tmp / "dora", DORA_TARGETS, True, seed=1)
    head = peft_adapter(base, tmp / "head", ["q_proj", "v_proj", "lm_head"], False, seed=2)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = {"dora": dora(input_ids=ids).logits, "head": head(input_ids=ids).logits,
               "base": load_base(base)(input_ids=ids).logits}
    calib = write_jsonl(tmp / "calib.jsonl", [{"text": t} for t in CORPUS[:8]])
    return {"tmp": tmp, "base": base, "dora": tmp / "dora", "head": tmp / "head", "ids": ids, "ref": ref,
            "calib": calib, "merged": {n: m.weight.detach().clone() for n, m in dora.merge_and_unload().named_modules()
                                       if isinstance(m, torch.nn.Linear)}}


def logits_of(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_base(base)
    AdapterSet.load(adapter, model).fold_into(model)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dora_delta_is_peft_dora(setup):
    """W + ΔW is PEFT's merged DoRA weight, per module; at full rank the import is PEFT's DoRA model."""
    cfg, modules = read_peft(setup["dora"])
    base = load_base(setup["base"])
    assert len(modules) == 2 * len(DORA_TARGETS)
    for name, parts in modules.items():
        w = base.get_submodule(name).weight.detach()
        merged = setup["merged"][name]
        got = w.double() + dora_delta(w, parts, scaling(cfg, name))
        assert (got - merged.double()).abs().max() <= 1e-5 * merged.abs().max(), name
    out = setup["tmp"] / "full"
    report = import_peft(setup["dora"], setup["base"], out, max_rank=64)
    assert report["kind"] == "dora" and report["max_rel_error"] == 0.0
    ref = setup["ref"]["dora"]
    assert (logits_of(setup["base"], out, setup["ids"]) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_rank_k_error_decreases_and_beats_the_base(setup):
    errors, gaps = [], []
    ref = setup["ref"]["dora"]
    for k in (1, R, 2 * R, 4 * R):
        report = import_peft(setup["dora"], setup["base"], setup["tmp"] / f"k{k}", max_rank=k)
        assert report["rank"] == k
        errors.append(report["max_rel_error"])
        gaps.append(float((logits_of(setup["base"], setup["tmp"] / f"k{k}", setup["ids"]) - ref).abs().max()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert 0 < errors[-1] < 1
    assert gaps[-1] < gaps[0] and gaps[2] < float((setup["ref"]["base"] - ref).abs().max()), gaps


def test_activation_weighting_lowers_the_output_error(setup):
    out = {}
    for kind in ("none", "activation"):
        report = import_peft(setup["dora"], setup["base"], setup["tmp"] / f"w-{kind}", max_rank=R,
                             weighting=kind, calib_data=setup["calib"])
        out[kind] = {n: e[1] for n, e in report["errors"].items()}
        assert report["calibrated"] and report["max_output_error"] == max(out[kind].values())
    assert sum(out["activation"].values()) < sum(out["none"].values()), out
    assert sum(out["activation"][n] < out["none"][n] for n in out["none"]) > len(out["none"]) // 2, out


def test_cli_default_rank_reports_errors(setup, run_cli):
    code, output = run_cli("import", "--from", "peft", "--adapter", str(setup["dora"]), "--base", str(setup["base"]),
                           "--out", str(setup["tmp"] / "cli"))
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith(f"dora adapter, {2 * len(DORA_TARGETS)} modules, rank {2 * R} "), output
    assert "max relative error" in lines[0] and "in model.layers." in lines[0], output
    assert any(line.split()[:2] == ["q_proj", "2"] for line in lines), output  # the per module type table
    assert lines[-1] == f"written to {setup['tmp'] / 'cli'}"
    assert AdapterSet.load(setup["tmp"] / "cli").config.options["rank"] == 2 * R


def test_head_lora_imports_exactly(setup):
    out = setup["tmp"] / "head-native"
    report = import_peft(setup["head"], setup["base"], out)
    assert report["kind"] == "lora" and "lm_head" in AdapterSet.load(out).config.targets
    ref = setup["ref"]["head"]
    assert (logits_of(setup["base"], out, setup["ids"]) - ref).abs().max() <= 1e-4 * ref.abs().max()


def edit_tensors(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, message", [
    ("rank0", "--max-rank must be at least 1, not 0"),
    ("no_calib", "--weighting activation needs --calib-data"),
    ("lora_max_rank", "are for DoRA adapters"),
    ("magnitude_shape", "the DoRA magnitude vector has shape [3]"),
    ("no_magnitude", "DoRA adapter (use_dora) without the magnitude vector"),
    ("tied_head", "ties to the input embeddings"),
])
def test_bad_inputs(setup, run_cli, tmp_path, case, message):
    from svd_serve.tiny import build_tiny_model

    adapter, base, extra = setup["dora"], setup["base"], []
    if case == "rank0":
        extra = ["--max-rank", "0"]
    elif case == "no_calib":
        extra = ["--weighting", "activation"]
    elif case == "lora_max_rank":
        adapter, extra = setup["head"], ["--max-rank", "8"]
    elif case in ("magnitude_shape", "no_magnitude"):
        key = next(k for k in load_file(setup["dora"] / "adapter_model.safetensors") if "magnitude" in k)
        edit = (lambda t: t.update({key: t[key][:3]})) if case == "magnitude_shape" else (lambda t: t.pop(key))
        adapter = edit_tensors(setup["dora"], tmp_path / case, edit)
    else:
        base = build_tiny_model(tmp_path / "tied", "llama", head_dim=32, tie_word_embeddings=True)
        adapter = setup["head"]
    code, output = run_cli("import", "--from", "peft", "--adapter", str(adapter), "--base", str(base),
                           "--out", str(tmp_path / "out"), *extra)
    one_error(code, output, message)
    assert not (tmp_path / "out").exists()


def test_vllm_refuses_a_head_lora_it_would_serve_wrongly(setup, tmp_path):
    from svd_serve.tiny import build_tiny_model

    head = types.SimpleNamespace(name="h", A={"lm_head": torch.zeros(1, 64)})
    conv.check_head("LlamaForCausalLM", [head], setup["base"])  # untied: served
    tied = build_tiny_model(tmp_path / "tied", "llama", head_dim=32, tie_word_embeddings=True)
    for arch, base, needle in (("LlamaForCausalLM", tied, "ties lm_head to the input embeddings"),
                               ("LlamaForCausalLM", None, "ties lm_head"),
                               ("Qwen2ForCausalLM", setup["base"], "for LlamaForCausalLM only")):
        with pytest.raises(SvdServeError, match=needle):
            conv.check_head(arch, [head], base)


@pytest.mark.vllm
def test_head_lora_in_installed_vllm():
    from vllm.model_executor.models import ModelRegistry

    for arch in conv.HEAD_LORA:
        assert "lm_head" in getattr(ModelRegistry._try_load_model_cls(arch), "embedding_modules", {}), arch


@pytest.mark.vllm
def test_vllm_serves_imported_dora_and_head_lora(setup, run_cli):
    """One offline engine: the base, the imported DoRA (rank 2r) and the imported head LoRA in one batch,
    against the Hugging Face model with the same factors."""
    tmp = setup["tmp"]
    for name, src in (("dora-lora", setup["dora"]), ("head-lora", setup["head"])):
        code, output = run_cli("import", "--from", "peft", "--adapter", str(src), "--base", str(setup["base"]),
                               "--out", str(tmp / "served" / name))
        assert code == 0, output
    code, output = run_cli("export", "--target", "vllm", "--base", str(setup["base"]), "--adapter",
                           str(tmp / "served" / "dora-lora"), "--adapter", str(tmp / "served" / "head-lora"),
                           "--out", str(tmp / "exp"))
    assert code == 0, output
    config = json.loads((tmp / "exp" / "head-lora" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]
    env = {**scratch_env(tmp), "VLLM_CPU_OMP_THREADS_BIND": "0", "SVD_SERVE_LOG": str(tmp / "verify.log")}
    out = subprocess.run([sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(setup["base"]),
                          "--export", str(tmp / "exp"), "--max-new-tokens", "8", "--kv-cache-mib", "64",
                          "--json", str(tmp / "verify.json")], env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    checks = json.loads((tmp / "verify.json").read_text())["checks"]
    assert set(checks) == {"(base)", "dora-lora", "head-lora"} and all(c["ok"] for c in checks.values())
    assert checks["head-lora"]["tokens"] != checks["(base)"]["tokens"]  # the adapter is really applied
