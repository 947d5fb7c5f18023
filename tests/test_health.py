"""The init health check of ``svd-serve train`` (``svd_serve.training.health``), and activation-aware minor
components (``-o select=activation``) on the real SmolLM2-135M-Instruct: there plain KaSA on the default
targets breaks the model before the first step, and the check refuses it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import one_error, write_jsonl

from svd_serve.errors import SvdServeError
from svd_serve.training import parse_limit
from svd_serve.methods import METHODS
from svd_serve.training import TrainConfig, load_config, train

DATA = Path(__file__).parent / "data"
EXACT_ZERO = {"lora", "delta", "svf", "svfit", "salt"}  # ΔW_init = 0 exactly
RESIDUAL = {"pissa", "milora", "olora", "corda-ipa", "corda-kpa", "sorsa", "soma", "kore"}  # cancels to round-off


def init_record(out: Path) -> dict:
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    return first["init_check"]


def test_limit_values():
    assert [parse_limit(v) for v in ("off", "OFF", "inf", "none", "0", 0, 0.0, None, False, float("inf"))] == [None] * 10
    assert parse_limit("0.1") == parse_limit(0.1) == 0.1
    for bad in ("-1", "lots", float("nan")):
        with pytest.raises(SvdServeError, match="max-init-loss-increase"):
            parse_limit(bad)
    base = {"base": "b", "data": "d", "out": "o"}
    assert load_config(None, **base).max_init_loss_increase == 0.05
    assert load_config(None, **base, max_init_loss_increase="off").max_init_loss_increase is None


def test_yaml_off_turns_the_refusal_off(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base: b\ndata: d\nout: o\nmax_init_loss_increase: off\n")  # YAML reads off as false
    assert load_config(config).max_init_loss_increase is None


@pytest.mark.parametrize("method", sorted(EXACT_ZERO | RESIDUAL))
def test_exact_inits_show_no_change(method, tiny_model, qa_data, tmp_path):
    """Every method but KaSA starts at the base: the record shows 0 (or float32 round-off) per module
    and no loss change, measured on the run's own model (absorbed frozen terms included)."""
    model = tiny_model("llama")
    calib = str(qa_data) if METHODS[method].needs_calibration else None
    rank = 4 if "rank" in METHODS[method].Options.fields() else None
    out = train(TrainConfig(base=str(model), data=str(qa_data), out=str(tmp_path / "o"), method=method, rank=rank,
                            targets="all-linear", steps=1, calib_data=calib, progress=False))
    check = init_record(out)
    assert len(check["modules"]) == 14 and check["rows"] == 16 and check["tokens"] > 0  # 2 layers × 7 Linears
    changes = list(check["modules"].values())
    if method in EXACT_ZERO:
        assert all(c == 0 for c in changes) and check["increase"] == 0
    else:  # float32 round-off of terms that cancel: ~1e-7 of the output
        assert max(changes) <= 1e-6 and abs(check["increase"]) <= 1e-5
    assert check["limit"] == 0.05
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]


def test_limit_option_refuses_and_allows(tiny_model, qa_data, tmp_path, run_cli):
    """KaSA at a high rank on the tiny model changes the loss a little; limits below and above that
    increase refuse and allow the run, and ``off`` and ``0`` never refuse."""
    args = ["train", "--base", tiny_model("llama"), "--data", qa_data, "--method", "kasa", "-o", "select=weight",
            "--rank", 24, "--targets", "all-linear", "--steps", 1, "--no-progress"]
    code, output = run_cli(*args, "--out", tmp_path / "off", "--max-init-loss-increase", "off")
    assert code == 0, output
    check = init_record(tmp_path / "off")
    increase = check["increase"]
    assert increase > 5e-3 and check["limit"] is None
    assert "init check on 16 rows" in output and "(limit off)" in output
    assert max(check["modules"].values()) > 0.1

    code, output = run_cli(*args, "--out", tmp_path / "low", "--max-init-loss-increase", increase / 2)
    one_error(code, output, "the kasa init raises the loss on 16 rows", "-o select=activation --calib-data",
              "--max-init-loss-increase off")
    assert not (tmp_path / "low").exists()  # refused before anything is written

    code, output = run_cli(*args, "--out", tmp_path / "high", "--max-init-loss-increase", increase * 2)
    assert code == 0, output
    assert init_record(tmp_path / "high")["increase"] == pytest.approx(increase, abs=1e-6)
    code, output = run_cli(*args, "--out", tmp_path / "zero", "--max-init-loss-increase", 0)
    assert code == 0, output


def test_activation_select_needs_calibration_data(tiny_model, qa_data, tmp_path, run_cli):
    code, output = run_cli("train", "--base", tiny_model("llama"), "--data", qa_data, "--out", tmp_path / "o",
                           "--method", "milora", "-o", "select=activation")
    one_error(code, output, "method milora needs --calib-data with select=activation")


# --- SmolLM2-135M-Instruct ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    """The real model, a few eval rows as collated batches, and input covariances of the default targets
    on calibration rows (disjoint from the eval rows)."""
    from transformers import AutoTokenizer

    from svd_serve.calib import input_covariances
    from svd_serve.dataset import encode, read_jsonl
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.realmodel import smollm2

    path = smollm2()
    model = load_base(path)
    tok = AutoTokenizer.from_pretrained(path)
    targets = resolve_targets(model, "q_proj,v_proj")
    covs = input_covariances(model, targets, read_jsonl(DATA / "chat-calib.jsonl")[:8], tok)
    examples = [encode(r, tok, 128) for r in read_jsonl(DATA / "chat-eval.jsonl")[:4]]
    return path, model, tok, targets, covs, examples


def smol_check(smol, method: str, **options):
    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.training import check_init
    from svd_serve.model import absorb_frozen
    from svd_serve.training import loss_sum

    _, base, tok, targets, covs, examples = smol
    model = copy.deepcopy(base)
    opts = make_options(method, rank=8, **options)
    adapters = AdapterSet.create(model, method, opts, targets, statistics=covs, progress=False)
    adapters.attach(model)
    absorb_frozen(model)  # as the training loop runs it
    health = check_init(model, adapters, examples, tok.pad_token_id,
                        lambda b: loss_sum(model, b),
                        batch_size=4, limit=None, say=lambda s: None)
    return health, adapters


def test_smollm2_plain_kasa_is_refused(smol, tmp_path, run_cli):
    data = write_jsonl(tmp_path / "chat.jsonl", [json.loads(line) for line in (DATA / "chat-eval.jsonl").open()][:4])
    args = ["train", "--base", smol[0], "--data", data, "--method", "kasa", "-o", "select=weight", "--rank", 8,
            "--steps", 1, "--batch-size", 4, "--out", tmp_path / "o", "--no-progress"]
    code, output = run_cli(*args)
    one_error(code, output, "the kasa init raises the loss on 4 rows",
              "it changes the output of v_proj")  # the worst module type first
    assert not (tmp_path / "o").exists()


def test_smollm2_default_kasa_trains(smol, tmp_path, run_cli):
    """The quick start: KaSA with its default options and no --calib-data drops the part of least output
    energy on the training rows, which keeps the loss within the default limit; it trains."""
    data = write_jsonl(tmp_path / "chat.jsonl", [json.loads(line) for line in (DATA / "chat-eval.jsonl").open()][:4])
    code, output = run_cli("train", "--base", smol[0], "--data", data, "--method", "kasa", "--rank", 8, "--steps", 1,
                           "--batch-size", 4, "--out", tmp_path / "o", "--no-progress")
    assert code == 0, output
    check = init_record(tmp_path / "o")
    assert check["rows"] == 4 and abs(check["increase"]) < check["limit"] == 0.05
    assert max(c for n, c in check["modules"].items() if n.endswith("v_proj")) < 0.05


def test_smollm2_activation_aware_kasa_keeps_the_base(smol):
    """Plain KaSA drops components that carry a large share of v_proj's output and raises the loss by
    nats; the activation-aware choice drops the part of least output energy on the calibration rows
    (less than the plain minor components in every module) and keeps the loss within the default limit."""
    _, _, _, targets, covs, _ = smol
    plain, plain_adapters = smol_check(smol, "kasa", select="weight")
    aware, aware_adapters = smol_check(smol, "kasa", select="activation")
    assert plain.increase > 1.0
    assert abs(aware.increase) < 0.05 and aware.increase < plain.increase
    v_plain = max(c for n, c in plain.modules.items() if n.endswith("v_proj"))
    v_aware = max(c for n, c in aware.modules.items() if n.endswith("v_proj"))
    assert v_plain > 0.05 and v_aware < v_plain / 2
    for name in targets:
        cov = covs[name].double()
        energy = {}
        for key, adapters in (("plain", plain_adapters), ("aware", aware_adapters)):
            layer = dict(adapters.items())[name]
            d = layer.dropped_us.double() @ layer.dropped_vh.double()
            energy[key] = float(torch.einsum("ij,jk,ik->", d, cov, d))
        assert energy["aware"] < energy["plain"], name


def test_smollm2_activation_aware_milora_is_exact(smol):
    """MiLoRA trains the components it takes out of the base, so its init is exact either way."""
    health, _ = smol_check(smol, "milora", select="activation")
    assert abs(health.increase) <= 1e-4 and max(health.modules.values()) <= 1e-6
