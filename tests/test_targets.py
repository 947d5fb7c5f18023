"""Choosing target modules, and all-linear adapters training on every supported architecture."""

from __future__ import annotations

import pytest
import torch

from svd_serve.adapter import AdapterSet
from svd_serve.errors import SvdServeError
from svd_serve.model import linear_names, load_base, resolve_targets
from svd_serve.tiny import ARCHS


@pytest.fixture(scope="module")
def llama(tiny_model):
    return load_base(tiny_model("llama"))


def test_suffixes(llama):
    names = resolve_targets(llama, "q_proj, v_proj")
    layers = llama.config.num_hidden_layers
    assert len(names) == 2 * layers
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj"))


def test_all_linear_excludes_the_output_head(llama):
    names = resolve_targets(llama, "all-linear")
    assert "lm_head" not in names
    assert sorted(names) == sorted(n for n in linear_names(llama) if n != "lm_head")
    assert len(names) == 7 * llama.config.num_hidden_layers


def test_regex(llama):
    names = resolve_targets(llama, r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("spec", ["mlp", r"model\.layers\.0\.mlp", "input_layernorm"])
def test_non_linear_target_names_the_module(llama, spec):
    with pytest.raises(SvdServeError, match=r"module model\.layers\.0\.(mlp|input_layernorm) is a \w+, not nn\.Linear"):
        resolve_targets(llama, spec)


@pytest.mark.parametrize("spec", ["nosuch_proj", r"model\.nosuch\..*"])
def test_target_matching_nothing(llama, spec):
    with pytest.raises(SvdServeError, match="matches no module"):
        resolve_targets(llama, spec)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_linear_trains_on_every_architecture(arch, tiny_model, qa_data, run_cli, tmp_path):
    base = tiny_model(arch)
    out = tmp_path / "adapter"
    code, output = run_cli("train", "--base", base, "--data", qa_data, "--method", "kasa", "--rank", "2",
                           "--targets", "all-linear", "--steps", "2", "--out", out)
    assert code == 0, output
    model = load_base(base)
    adapters = AdapterSet.load(out, model)
    expected = [n for n in linear_names(model) if model.get_submodule(n) is not model.get_output_embeddings()]
    assert sorted(adapters.config.targets) == sorted(expected)
    # two optimizer steps moved B away from its zero init in every layer
    assert all(layer.B.abs().max() > 0 for _, layer in adapters.items())
    # and the trained adapter runs on the model
    adapters.attach(model)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
