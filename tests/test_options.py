"""The method contract: each method's options dataclass is its schema (types, defaults, docs, ranges,
regularizer weights); `-o`, `--reg`, `--rank`/`--alpha`, `svd-serve methods` and validation follow from
it; the per-step hook is called for every layer after every update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import adapter_tensors, one_error

from svd_serve.adapter import AdapterConfig, AdapterSet, make_options, parse_option_values
from svd_serve.errors import SvdServeError
from svd_serve.methods import METHODS, RankOptions
from svd_serve.methods.lora import LoRA


@pytest.mark.parametrize("method", list(METHODS))
def test_every_option_is_typed_documented_and_listed(method, run_cli):
    options = METHODS[method].Options
    code, out = run_cli("methods", method)
    assert code == 0, out
    assert out.startswith(f"{method}  {METHODS[method].paper}") and f"ΔW rank ≤ {METHODS[method].bound}" in out
    assert ("needs --calib-data" in out) == METHODS[method].needs_calibration
    for name, field in options.fields().items():
        kind, optional = options.kind(name)
        assert kind in (bool, int, float, str) and field.metadata["doc"]
        shown = "none" if field.default is None else str(field.default).lower()
        if name == "alpha" and field.default is None:
            shown = f"{METHODS[method].alpha_per_rank:g}·rank"
        assert f"-o {name}={shown} " in out and field.metadata["doc"].split()[0] in out
    assert options() == make_options(method)  # the defaults are valid values


def test_methods_lists_every_method(run_cli):
    code, out = run_cli("methods")
    assert code == 0 and all(f"\n{m}  " in "\n" + out for m in METHODS)


def test_values_are_parsed_by_their_field_type():
    assert parse_option_values("pissa", ["niter=4", "alpha=3", "rank=2"]) == {"niter": 4, "alpha": 3.0, "rank": 2}
    assert parse_option_values("pissa", ["niter=none"]) == {"niter": None}
    assert parse_option_values("kore", ["freeze-a=yes"]) == {"freeze_a": True}
    assert parse_option_values("kasa", {"beta": "1e-3", "gamma": 0}) == {"beta": 1e-3, "gamma": 0}
    opts = make_options("kasa", rank=4, gamma=0)
    assert (opts.rank, opts.gamma, type(opts.gamma)) == (4, 0.0, float)


def test_regularizer_weights_come_from_the_schema():
    weights = {m: cls.Options.regularizer_weights() for m, cls in METHODS.items()}
    assert weights["kasa"] == ["beta", "gamma"] and weights["sorsa"] == ["gamma"] and weights["salt"] == ["reg"]
    assert not any(weights[m] for m in ("lora", "pissa", "svf", "kore", "delta"))


@pytest.mark.parametrize("method, values, message", [
    ("svf", {"alpha": 2.0}, "method svf has no option alpha (it has none"),
    ("svf", {"rank": 4}, "method svf has no option rank"),
    ("sorsa", {"alpha": 2.0}, "method sorsa has no option alpha"),
    ("svfit", {"alpha": 2.0}, "method svfit has no option alpha"),
    ("salt", {"alpha": 2.0}, "method salt has no option alpha"),
    ("lora", {"beta": 1.0}, "method lora has no option beta"),
    ("lora", {"rank": 0}, "lora: option rank must be >= 1, not 0"),
    ("lora", {"rank": -3}, "option rank must be >= 1"),
    ("lora", {"rank": "4.5"}, "option rank must be an integer, not '4.5'"),
    ("lora", {"rank": 4.0}, "option rank must be an integer"),
    ("lora", {"alpha": 0}, "option alpha must be > 0"),
    ("lora", {"alpha": "inf"}, "option alpha must be finite"),
    ("kasa", {"beta": float("nan")}, "option beta must be finite, not nan"),
    ("kasa", {"gamma": "-1e-3"}, "option gamma must be >= 0"),
    ("salt", {"ratio": 1.5}, "option ratio must be < 1"),
    ("salt", {"ratio": 0}, "option ratio must be > 0"),
    ("pissa", {"niter": -1}, "option niter must be >= 0"),
    ("kore", {"freeze_a": "maybe"}, "option freeze_a is true or false, not 'maybe'"),
    ("kore", {"freeze_a": 1}, "option freeze_a must be true or false"),
    ("corda-kpa", {"damp": 0.0}, "option damp must be > 0"),
    ("kasa", {"select": "activations"}, "option select must be one of weight, activation, not 'activations'"),
    ("milora", {"damp": -1.0}, "option damp must be >= 0"),
])
def test_bad_options_are_refused(method, values, message):
    with pytest.raises(SvdServeError) as e:
        make_options(method, **values)
    assert message in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--method", "svf", "--alpha", "2"], "method svf has no option alpha"),
    (["--method", "svf", "--rank", "4"], "method svf has no option rank"),
    (["--method", "sorsa", "--alpha", "2"], "method sorsa has no option alpha"),
    (["--method", "lora", "--rank", "0"], "option rank must be >= 1"),
    (["--method", "kasa", "-o", "beta=nan"], "option beta must be finite"),
    (["--method", "kasa", "-o", "beta"], "expected KEY=VALUE"),
    (["--method", "kasa", "--rank", "4", "-o", "rank=8"], "rank is given twice"),
    (["--method", "kasa", "--reg", "beta=1", "-o", "beta=2"], "beta is given twice"),
    (["--method", "lora", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--method", "lora", "--warmup", "-1"], "--warmup must be a finite number >= 0"),
    (["--method", "lora", "--save-every", "0"], "--save-every must be at least 1"),
])
def test_train_refuses_bad_options_before_any_work(args, message, run_cli, tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli("train", "--base", tiny_model("llama"), "--data", qa_data, "--out", out, "--steps", 1,
                           "--no-progress", *args)
    one_error(code, output, message)
    assert not out.exists()


def test_saved_options_of_earlier_versions_load():
    """Files of svd-serve 0.1 held rank and alpha for every method, used or not: they still load."""
    config = AdapterConfig(method="svf", options={"rank": 8, "alpha": None}, targets={"x": [6, 4]},
                           target_spec="", architecture="", base_fingerprint="")
    assert AdapterSet(config).layers["x"].opts == METHODS["svf"].Options()
    config.options = {"rank": 8, "alpha": None, "beta": 1.0}
    with pytest.raises(SvdServeError, match="method svf has no option beta"):
        AdapterSet(config)


# --- the per-step hook ------------------------------------------------------------------------------
class Counting(LoRA):
    """LoRA that records, in buffers, each call of its hook: how many, the last step, and whether the
    gradient and the updated parameters were there."""

    name = "counting"

    def build(self) -> None:
        super().build()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros((), dtype=torch.long))
        self.register_buffer("with_grad", torch.zeros((), dtype=torch.long))

    def after_step(self, step, total_steps):
        self.calls += 1
        self.last.fill_(step)
        self.total.fill_(total_steps)
        self.with_grad += int(self.A.grad is not None and self.B.grad is not None)


def test_the_hook_runs_for_every_layer_after_every_update(tiny_model, qa_data, tmp_path, monkeypatch):
    from svd_serve.training import TrainConfig, train

    monkeypatch.setitem(METHODS, "counting", Counting)
    out = train(TrainConfig(base=str(tiny_model("llama")), data=str(qa_data), out=str(tmp_path / "o"),
                            method="counting", steps=3, lr=1e-2, progress=False))
    tensors = adapter_tensors(out)
    layers = {k.rsplit(".", 1)[0] for k in tensors}
    assert len(layers) == 4  # q_proj and v_proj of two layers
    for layer in layers:
        assert [int(tensors[f"{layer}.{k}"]) for k in ("calls", "last", "total", "with_grad")] == [3, 3, 3, 3]
    assert tensors[f"{sorted(layers)[0]}.B"].abs().max() > 0  # the updates were made


def test_the_default_hook_changes_nothing():
    layer = LoRA(6, 4, make_options("lora", rank=2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.after_step(1, 10)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert isinstance(layer.opts, RankOptions) and dataclasses.is_dataclass(layer.opts)
    assert math.isclose(layer.scale, 2.0)
