"""Quantized checkpoints as ``--base``: the quantized copies :func:`svd_serve.quant.quantize_checkpoint`
writes, their dequantized weights against independent readers (transformers' own loaders for
compressed-tensors and bitsandbytes, vLLM's and compressed-tensors' unpackers for GPTQ and AWQ),
the quantization error each scheme implies, and every command on a quantized base."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import folded, make_adapter, one_error
from safetensors.torch import load_file

from svd_serve.errors import SvdServeError
from svd_serve.model import fingerprint, load_base
from svd_serve.quant import quantize_checkpoint
from svd_serve.weights import Weights

GROUP = 32  # (the tiny model's in-features are 64 and 128: two and four groups per row)
SCHEMES = ["W4A16", "W4A16_ASYM", "W8A8", "FP8", "nf4", "int8", f"gptq-w4g{GROUP}", f"awq-w4g{GROUP}"]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    """``quantized(scheme)``: the tiny base's quantized copy, written once per module."""
    tmp = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(scheme: str):
        if scheme not in cache:
            cache[scheme] = quantize_checkpoint(base, tmp / scheme, scheme,
                                                group_size=GROUP if scheme.startswith("W4A16") else None)
        return cache[scheme]

    return get


@pytest.fixture(scope="module")
def qbase(quantized):
    return quantized("W4A16")


@pytest.fixture(scope="module")
def adapter(qbase, tmp_path_factory):
    """A LoRA made on the dequantized W4A16 base."""
    return make_adapter(qbase, tmp_path_factory.mktemp("qadapter") / "lora", "lora", targets="all-linear",
                        scale=0.1)


def linears(path) -> list[str]:
    return sorted(Weights(path).quantization.modules)


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


# --- what is written ------------------------------------------------------------------------------
def test_written_checkpoints_are_model_directories(base, quantized):
    expect = {"W4A16": ("compressed-tensors", "pack-quantized", 4, GROUP),
              "W4A16_ASYM": ("compressed-tensors", "pack-quantized", 4, GROUP), "W8A8": ("compressed-tensors", "int-quantized", 8, None),
              "FP8": ("compressed-tensors", "float-quantized", 8, None), "nf4": ("bitsandbytes", "nf4", 4, None),
              "int8": ("bitsandbytes", "int8", 8, None), f"gptq-w4g{GROUP}": ("gptq", "gptq", 4, GROUP),
              f"awq-w4g{GROUP}": ("awq", "awq", 4, GROUP)}
    full = Weights(base)
    every = sorted(n for n, m in full.skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    for scheme in SCHEMES:
        path = quantized(scheme)
        q = Weights(path).quantization
        assert (q.method, q.format, q.bits, q.group) == expect[scheme], scheme
        assert sorted(q.modules) == every and q.dtype == torch.float32
        assert (path / "tokenizer.json").is_file() and (path / ".svd-serve").is_file()
        config = json.loads((path / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == q.method
        # the head and the embeddings are kept as they are
        stored = load_file(path / "model.safetensors")
        for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
            assert torch.equal(stored[name], full.read(name))
    qc = json.loads((quantized("W4A16") / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], weights["num_bits"], weights["group_size"], weights["symmetric"], qc["ignore"]) == \
        ("pack-quantized", 4, GROUP, True, ["lm_head"])
    acts = json.loads((quantized("W8A8") / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert acts["input_activations"]["dynamic"] and acts["input_activations"]["strategy"] == "token"
    assert acts["weights"]["strategy"] == "channel" and acts["weights"]["num_bits"] == 8


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A8", "FP8", "nf4", "int8"])
def test_dequantized_weights_equal_transformers_loader(scheme, quantized):
    """transformers' own loader (compressed-tensors decompressing on load; bitsandbytes' Linear4bit /
    Linear8bitLt) reads every quantized module to the weight svd-serve dequantizes."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = quantized(scheme)
    kwargs = {} if scheme in ("nf4", "int8") else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kwargs)
    ckpt = Weights(path)
    for name in linears(path):
        w = model.get_submodule(name).weight
        if scheme == "nf4":
            import bitsandbytes.functional as bnbf

            want = bnbf.dequantize_4bit(w.data, w.quant_state)
        elif scheme == "int8":
            want = w.data.float() * w.SCB.float()[:, None] / 127
        else:
            want = w.data
        torch.testing.assert_close(ckpt.weight(name), want.float(), rtol=1.3e-6, atol=0, msg=name)


def test_gptq_and_awq_layouts_match_vllm_and_compressed_tensors(quantized):
    """GPTQ: vLLM's ``gptq_pack`` packs the unpacked values to the stored ``qweight``, its unpacker
    reads them back, and the weight rebuilt from them with the version-1 zero (stored + 1) is ours.
    AWQ: vLLM's ``awq_pack`` packs to the stored ``qweight``; compressed-tensors' AutoAWQ converter
    unpacks it and the zeros to the weight we dequantize."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        awq_pack, gptq_pack, unpack_quantized_values_into_int32)
    from vllm.scalar_type import scalar_types

    path = quantized(f"gptq-w4g{GROUP}")
    stored, ckpt = load_file(path / "model.safetensors"), Weights(path)
    for name in linears(path):
        qweight, qzeros, scales, g_idx = (stored[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        q = unpack_quantized_values_into_int32(qweight, scalar_types.uint4, packed_dim=0)  # [in, out]
        z = unpack_quantized_values_into_int32(qzeros, scalar_types.uint4, packed_dim=1) + 1
        assert torch.equal(gptq_pack(q, 4, *q.shape), qweight)
        want = ((q - z[g_idx.long()]).float() * scales[g_idx.long()]).t()
        torch.testing.assert_close(ckpt.weight(name), want, rtol=1.3e-6, atol=0, msg=name)
        assert torch.equal(z, torch.full_like(z, 8))  # symmetric

    path = quantized(f"awq-w4g{GROUP}")
    stored, ckpt = load_file(path / "model.safetensors"), Weights(path)
    for name in linears(path):
        qweight, qzeros, scales = (stored[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
        q, z = AutoAWQConverter.reverse_awq_order(*AutoAWQConverter.unpack_awq(qweight, qzeros, 4), 4)
        q, z = q.int() & 15, z.int() & 15
        assert torch.equal(awq_pack(q, 4, *q.shape), qweight) and torch.equal(awq_pack(z, 4, *z.shape), qzeros)
        groups = torch.arange(q.shape[0]) // GROUP
        want = ((q - z[groups]).float() * scales[groups]).t()
        torch.testing.assert_close(ckpt.weight(name), want, rtol=1.3e-6, atol=0, msg=name)
        assert len(z.unique()) > 1  # asymmetric: the zeros vary


def scale_per_weight(scheme: str, stored: dict, name: str, shape) -> torch.Tensor:
    """The step of the quantization grid each weight value was rounded on."""
    out_f, in_f = shape
    if scheme.startswith("W4A16"):
        return stored[f"{name}.weight_scale"].repeat_interleave(GROUP, 1)
    if scheme == "W8A8":
        return stored[f"{name}.weight_scale"].expand(out_f, in_f)
    if scheme == "int8":
        return (stored[f"{name}.SCB"] / 127)[:, None].expand(out_f, in_f)
    return stored[f"{name}.scales"].repeat_interleave(GROUP, 0).t()  # gptq, awq: [groups, out]


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A8", "int8", f"gptq-w4g{GROUP}", f"awq-w4g{GROUP}", "nf4", "FP8"])
def test_quantization_error_is_the_schemes(scheme, base, quantized):
    """Round to nearest: every weight within half a grid step of its dequantized value (nf4: half the
    widest gap of its codebook times the block's absmax; FP8 E4M3: half an ulp, 2^-4 relative), and
    not closer everywhere (the weights were quantized)."""
    path = quantized(scheme)
    stored, ckpt, full = load_file(path / "model.safetensors"), Weights(path), Weights(base)
    for name in linears(path):
        w, deq = full.weight(name).float(), ckpt.weight(name)
        err = (w - deq).abs()
        if scheme == "nf4":
            code = stored[f"{name}.weight.quant_map"].float()
            bound = ((code[1:] - code[:-1]).max() / 2 * stored[f"{name}.weight.absmax"]).repeat_interleave(64).view_as(w)
            step = bound * 2
        elif scheme == "FP8":
            scale = stored[f"{name}.weight_scale"].float()
            bound = (w.abs() * 2.0 ** -4).clamp_min(scale * 2.0 ** -10)  # (the subnormal step below 2^-6)
            step = bound * 2
        else:
            step = scale_per_weight(scheme, stored, name, w.shape).float()
            bound = step / 2
        assert (err <= bound * (1 + 1e-6) + 1e-7).all(), (name, float((err - bound).max()))
        assert float((err / step).max()) > 0.25, name  # (the grid was not finer than the scheme's)


# --- reading a quantized base ----------------------------------------------------------------------
def test_weights_and_load_base_give_the_dequantized_model(base, qbase):
    """``Weights`` reports the logical shape and float dtype; ``load_base`` builds a float model with
    the dequantized weights (unquantized tensors as stored); both fingerprints agree with each other
    and differ from the full-precision base's."""
    ckpt, model = Weights(qbase), load_base(qbase)
    names = linears(qbase)
    for name in names:
        info = ckpt.weight_info(name)
        assert info.quantized and info.shape == tuple(model.get_submodule(name).weight.shape) and info.dtype == "F32"
        assert torch.equal(model.get_submodule(name).weight, ckpt.weight(name))
    assert torch.equal(model.lm_head.weight, Weights(base).read("lm_head.weight"))
    assert model.svd_serve_quantization.describe() == f"4-bit compressed-tensors (pack-quantized, group {GROUP})"
    assert ckpt.fingerprint(names) == fingerprint(model, names) != Weights(base).fingerprint(names)
    assert not any("weight_packed" in k for k in model.state_dict())


def test_commands_on_a_quantized_base(qbase, adapter, run_cli, tmp_path):
    """export (with its logit check), verify --target peft, inspect, import, merge --max-rank and
    extract, all against the quantized base."""
    code, out = run_cli("export", "--target", "peft", "--base", qbase, "--adapter", adapter, "--out",
                        tmp_path / "peft", "--check-logits")
    assert code == 0 and "logits vs adapted model" in out, out
    code, out = run_cli("verify", "--target", "peft", "--base", qbase, "--export", tmp_path / "peft")
    assert code == 0, out
    code, out = run_cli("inspect", "--adapter", adapter, "--base", qbase)
    assert code == 0 and "q_proj" in out, out
    code, out = run_cli("import", "--from", "peft", "--adapter", tmp_path / "peft", "--base", qbase, "--out", tmp_path / "imp")
    assert code == 0, out
    want, ckpt = dense_deltas(adapter), Weights(qbase)
    got = dense_deltas(tmp_path / "imp", ckpt)
    for name, d in want.items():
        torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-6)
    second = make_adapter(qbase, tmp_path / "second", "lora", targets="all-linear", seed=3, scale=0.1)
    code, out = run_cli("merge", "--base", qbase, "--adapter", adapter, "--adapter", second, "--method", "linear",
                        "--max-rank", 8, "--out", tmp_path / "merged")
    assert code == 0 and "rank 8" in out, out
    # a full fine-tune of the dequantized base: extract recovers ΔW
    code, out = run_cli("fold", "--base", qbase, "--adapter", adapter, "--out", tmp_path / "ft", "--dtype", "float32")
    assert code == 0, out
    code, out = run_cli("extract", "--base", qbase, "--finetuned", tmp_path / "ft", "--max-rank", 4,
                        "--out", tmp_path / "ext")
    assert code == 0, out
    got = dense_deltas(tmp_path / "ext", ckpt)
    for name, d in want.items():
        assert float((got[name] - d).norm() / d.norm()) < 1e-5, name


def dense_deltas(path, base=None) -> dict[str, torch.Tensor]:
    """Each module's dense ΔW of the native adapter at ``path`` (checked against ``base`` if given)."""
    from svd_serve.adapter import AdapterSet

    return {name: layer.delta().dense() for name, layer in AdapterSet.load(path, base).items()}


# --- fold --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fold_writes_the_dequantized_base_plus_delta(dtype, qbase, adapter, tmp_path, run_cli):
    """fold --dtype: transformers loads the result as a plain checkpoint of that dtype (no
    quantization_config, no quantization tensors), equal to the dequantized base + ΔW."""
    from transformers import AutoModelForCausalLM

    code, out = run_cli("fold", "--base", qbase, "--adapter", adapter, "--out", tmp_path / "f", "--dtype", dtype)
    assert code == 0, out
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype
    stored = load_file(tmp_path / "f" / "model.safetensors")
    assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in stored)
    assert {str(stored[f"{n}.weight"].dtype) for n in linears(qbase)} == {f"torch.{dtype}"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "f", dtype=torch.float32)
    want = folded(qbase, adapter)
    if dtype == "float32":
        assert (logits(model) - logits(want)).abs().max() < 1e-4
        for n in linears(qbase):  # W_deq + B A in float32, rounded once
            torch.testing.assert_close(model.get_submodule(n).weight, want.get_submodule(n).weight, rtol=1.3e-6, atol=1e-7)
    else:
        for n in linears(qbase):
            assert torch.equal(stored[f"{n}.weight"], want.get_submodule(n).weight.to(torch.bfloat16)), n


def test_fold_of_gptq_and_bitsandbytes_bases(quantized, base, tmp_path):
    from svd_serve.fold import fold

    for scheme in (f"gptq-w4g{GROUP}", "nf4"):
        path = quantized(scheme)
        adapter = make_adapter(path, tmp_path / f"a-{scheme}", "lora", targets="q_proj,v_proj", scale=0.1)
        fold(path, adapter, tmp_path / scheme, dtype="float32")
        names = set(load_file(tmp_path / scheme / "model.safetensors"))
        assert names == set(load_file(base / "model.safetensors")), scheme  # a plain checkpoint's tensors
        got, want = load_base(tmp_path / scheme), folded(path, adapter)
        assert got.svd_serve_quantization is None
        assert (logits(got) - logits(want)).abs().max() < 1e-4, scheme


def test_fold_needs_a_dtype_for_a_quantized_base(qbase, base, adapter, run_cli, tmp_path):
    code, out = run_cli("fold", "--base", qbase, "--adapter", adapter, "--out", tmp_path / "f")
    one_error(code, out, "4-bit compressed-tensors", "--dtype float16, bfloat16 or float32")
    code, out = run_cli("merge", "--base", qbase, "--adapter", adapter, "--adapter", adapter, "--method", "linear",
                        "--fold", "--out", tmp_path / "m")
    one_error(code, out, "dequantized weights", "--dtype")
    plain = make_adapter(base, tmp_path / "plain", "lora")
    code, out = run_cli("fold", "--base", base, "--adapter", plain, "--out", tmp_path / "g", "--dtype", "float16")
    one_error(code, out, "--dtype applies to quantized bases only")
    assert not (tmp_path / "f").exists() and not (tmp_path / "m").exists() and not (tmp_path / "g").exists()


def test_merge_fold_with_a_dtype(qbase, adapter, run_cli, tmp_path):
    code, out = run_cli("merge", "--base", qbase, "--adapter", adapter, "--adapter", adapter, "--method", "linear",
                        "--weights", "0.5,0.5", "--fold", "--dtype", "float32", "--out", tmp_path / "m")
    assert code == 0, out
    got = load_base(tmp_path / "m")
    assert (logits(got) - logits(folded(qbase, adapter))).abs().max() < 1e-4


# --- refusals ------------------------------------------------------------------------------------------
def edited(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_formats_and_missing_libraries_are_refused(qbase, quantized, adapter, run_cli, tmp_path, monkeypatch):
    hqq = edited(qbase, tmp_path / "hqq", lambda qc: qc.update(quant_method="hqq"))
    code, out = run_cli("inspect", "--adapter", adapter, "--base", hqq)
    one_error(code, out, "quant_method 'hqq'", "cannot read")
    marlin = edited(qbase, tmp_path / "marlin", lambda qc: qc.update(format="marlin-24") or
                    qc["config_groups"]["group_0"].update(format="marlin-24"))
    with pytest.raises(SvdServeError, match="compressed-tensors format 'marlin-24' is not supported"):
        Weights(marlin)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # (import fails as if not installed)
    code, out = run_cli("export", "--target", "peft", "--base", qbase, "--adapter", adapter, "--out", tmp_path / "e")
    one_error(code, out, "compressed-tensors quantization", "pip install compressed-tensors")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SvdServeError, match="pip install bitsandbytes"):
        Weights(quantized("nf4"))


def test_an_adapter_of_the_full_precision_base_is_told_apart(base, qbase, run_cli, tmp_path):
    """An adapter trained on the full-precision base does not pass for one of the quantized base; the
    refusal says the base is quantized."""
    plain = make_adapter(base, tmp_path / "plain", "lora")
    code, out = run_cli("export", "--target", "peft", "--base", qbase, "--adapter", plain, "--out", tmp_path / "e")
    line = one_error(code, out, "different base", f"this base is a 4-bit compressed-tensors (pack-quantized, group {GROUP}) "
                     "quantization: an adapter trained on the full-precision base must be exported against that base "
                     "(--base), with this one as --served-base to write it for this quantized copy")
    assert "\n" not in line.strip()
    code, out = run_cli("export", "--target", "peft", "--base", base, "--adapter", plain, "--out", tmp_path / "ok")
    assert code == 0, out
