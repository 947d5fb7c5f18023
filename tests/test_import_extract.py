"""``svd-serve import --from peft`` against PEFT's own models (LoRA, PiSSA, OLoRA, KaSA trained a few
steps with PEFT), and ``svd-serve extract`` against a dense SVD of the fine-tune's difference."""

from __future__ import annotations

import pytest
import torch

from svd_serve.adapter import AdapterSet
from svd_serve.linalg import compress
from svd_serve.model import load_base, resolve_targets

import peft  # noqa: E402  (a dev dependency: a missing one must fail, not skip)
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def peft_train(base, config, steps=3, initial=None):
    """A PEFT model trained ``steps`` AdamW steps on random tokens (KaSA: with its regularizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    if initial is not None:
        model.save_pretrained(initial)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        if config.kasa_config is not None:
            loss = loss + model.base_model._get_kasa_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_import_kasa_exports_to_peft_lora(base, run_cli, tmp_path):
    """PEFT's KaSA (which PEFT cannot convert to LoRA) → native → PEFT LoRA on the UNMODIFIED base
    reproduces PEFT's own KaSA model."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          kasa_config=peft.KasaConfig())
    trained = peft_train(base, cfg)
    want = logits(trained)
    trained.save_pretrained(tmp_path / "kasa")
    code, out = run_cli("import", "--from", "peft", "--adapter", tmp_path / "kasa", "--base", base,
                        "--out", tmp_path / "native")
    assert code == 0, out
    assert "kasa adapter" in out and "rank 8" in out
    code, out = run_cli("export", "--target", "peft", "--base", base, "--adapter", tmp_path / "native",
                        "--out", tmp_path / "lora")
    assert code == 0, out
    served = peft.PeftModel.from_pretrained(load_base(base), tmp_path / "lora").eval()
    gap = (logits(served) - want).abs().max()
    assert gap <= 1e-4, gap
    # the truncation matters: without the dropped components the outputs differ clearly
    plain = load_base(base)
    assert (logits(plain) - want).abs().max() > 100 * gap


@pytest.mark.parametrize("init", [False, "pissa", "olora"])
def test_import_lora_pissa_olora(base, run_cli, tmp_path, init):
    """Trained against PEFT's residual base; imported (initial factors re-derived from the original
    base, or read from --initial) they reproduce PEFT's model on the original base."""
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    trained = peft_train(base, cfg, initial=tmp_path / "initial")
    want = logits(trained)
    trained.save_pretrained(tmp_path / "peft")
    variants = [[]] + ([["--initial", tmp_path / "initial"]] if init else [])
    for extra in variants:
        code, out = run_cli("import", "--from", "peft", "--adapter", tmp_path / "peft", "--base", base, *extra,
                            "--out", tmp_path / "native", "--overwrite")
        assert code == 0, out
        model = load_base(base)
        AdapterSet.load(tmp_path / "native", model).attach(model)
        assert (logits(model) - want).abs().max() <= 1e-4


def make_finetune(base, out):
    """A 'full fine-tune': dense changes to q/v/down projections and the head; the rest untouched."""
    model = load_base(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in resolve_targets(model, "q_proj,v_proj,down_proj") + ["lm_head"]:
            w = model.get_submodule(name).weight
            w += 0.02 * torch.randn(w.shape, generator=g)
    model.save_pretrained(out)
    return out


def test_extract(base, run_cli, tmp_path):
    ft_dir = make_finetune(base, tmp_path / "ft")
    model, ft = load_base(base), load_base(ft_dir)
    changed = resolve_targets(model, "q_proj,v_proj,down_proj")

    code, out = run_cli("extract", "--base", base, "--finetuned", ft_dir, "--max-rank", 512, "--out", tmp_path / "full")
    assert code == 0, out
    assert "unchanged modules left out" in out and "lm_head.weight" in out
    full = AdapterSet.load(tmp_path / "full", model)
    assert sorted(full.config.targets) == sorted(changed)
    full.fold_into(model)
    for name in changed:
        torch.testing.assert_close(model.get_submodule(name).weight, ft.get_submodule(name).weight, rtol=0, atol=1e-6)

    model = load_base(base)
    for args, name in ((["--max-rank", 5], "r5"), (["--energy", 0.9], "e90")):
        code, out = run_cli("extract", "--base", base, "--finetuned", ft_dir, *args,
                            "--targets", "q_proj,v_proj,down_proj", "--out", tmp_path / name)
        assert code == 0, out
        for n, layer in AdapterSet.load(tmp_path / name, model).items():
            diff = (ft.get_submodule(n).weight - model.get_submodule(n).weight).double()
            u, s, vh = torch.linalg.svd(diff, full_matrices=False)
            energy = s.square().cumsum(0) / s.square().sum()
            k = 5 if name == "r5" else int((energy < 0.9).sum()) + 1
            a, b = layer.delta()
            got = b.double() @ a.double()
            assert compress(a, b).rank == k
            # Eckart–Young: the truncated SVD of the dense difference (mergekit-extract-lora's result)
            want = (u[:, :k] * s[:k]) @ vh[:k]
            assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want)
            err = torch.linalg.norm(diff - got) / torch.linalg.norm(diff)
            assert abs(err - s[k:].square().sum().sqrt() / s.square().sum().sqrt()) <= 1e-6


def test_bad_input(base, run_cli, tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2")
    peft_train(base, cfg, steps=0).save_pretrained(tmp_path / "niter")
    (tmp_path / "plain").mkdir()
    cases = [
        (["import", "--from", "peft", "--adapter", tmp_path / "niter", "--base", base], "--initial"),
        (["import", "--from", "peft", "--adapter", tmp_path / "plain", "--base", base], "not a PEFT adapter"),
        (["extract", "--base", base, "--finetuned", base, "--energy", 1.5], "(0, 1]"),
        (["extract", "--base", base, "--finetuned", base, "--max-rank", 2, "--energy", 0.5], "exactly one of"),
        (["extract", "--base", base, "--finetuned", base, "--max-rank", 2], "does not differ"),
    ]
    for args, message in cases:
        code, out = run_cli(*args, "--out", tmp_path / "out")
        lines = [ln for ln in out.splitlines() if ln.strip() and "Loading weights" not in ln]  # transformers' bar
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out
        assert not (tmp_path / "out").exists()
