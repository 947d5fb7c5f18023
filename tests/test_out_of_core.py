"""Out of core: fold, merge, export, extract, import and inspect read the base one tensor at a time.

- results equal the in-memory path (the model loaded, folded, saved) bit for bit, on single-file and
  sharded bases, in float32, bfloat16 and float16, and on SmolLM2 (tied embeddings);
- sharded outputs (index, shard files, dtypes) load in transformers with the same logits, exports of
  a sharded base load in PEFT, and vLLM serves a sharded folded checkpoint;
- on a bfloat16 checkpoint several times larger than the process needs, fold, export, merge and
  extract peak below the checkpoint's size (peak RSS of a subprocess), and load_base converts a
  checkpoint to another dtype without holding both copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MAX_LOGIT_GAP, logits, make_adapter
from safetensors.torch import load_file

from svd_serve.adapter import AdapterConfig, AdapterSet
from svd_serve.weights import SAFE_INDEX, Weights, ShardWriter, copy_model_files, shard_by_size
from svd_serve.merge import MERGES, MergeParams
from svd_serve.model import add_low_rank_, fingerprint, load_base, resolve_targets

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def resave(src: Path, out: Path, dtype: torch.dtype | str = "auto", max_shard_size: str | None = None,
           safe: bool = True) -> Path:
    """``src`` loaded (in memory) and saved again: another dtype, shards, or ``.bin`` files."""
    model = load_base(src, dtype)
    if safe:
        model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:  # transformers writes safetensors only
        out.mkdir(parents=True)
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    copy_model_files(src, out)
    return out


def state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Weights(path)
    return {n: ckpt.read(n) for n in ckpt.tensors}


def check_index(path: Path) -> None:
    """The index lists every tensor of every shard once, each shard exists, total_size adds up."""
    index = json.loads((path / SAFE_INDEX).read_text())
    ckpt = Weights(path)
    assert set(index["weight_map"]) == set(ckpt.tensors)
    assert {i.file.name for i in ckpt.tensors.values()} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == ckpt.nbytes
    assert len(set(index["weight_map"].values())) > 1


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_from_files(llama, tmp_path, dtype):
    """The digest read off the files (samples only) is the digest of the loaded model, whatever
    the dtype it is loaded in and however the checkpoint is sharded."""
    single = resave(llama, tmp_path / "single", dtype)
    sharded = resave(llama, tmp_path / "sharded", dtype, max_shard_size="100KB")
    model = load_base(single)
    names = resolve_targets(model, "all-linear")
    want = fingerprint(model, names)
    assert want == fingerprint(load_base(single, "auto"), names)
    assert Weights(single).fingerprint(names) == want
    assert Weights(sharded).fingerprint(names) == want
    assert Weights(sharded).fingerprint(names[:3]) != want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_equals_in_memory_fold(llama, tmp_path, run_cli, dtype):
    base = resave(llama, tmp_path / "base", dtype, max_shard_size="150KB")
    adapter = make_adapter(base, tmp_path / "kasa", "kasa", targets="all-linear")
    reference = load_base(base, "auto")
    AdapterSet.load(adapter, reference).fold_into(reference)  # the in-memory fold
    reference_state = reference.state_dict()

    # the base's own shard layout, and a re-sharded one
    for name, extra in (("same", []), ("resharded", ["--max-shard-size", "60KB"])):
        out = tmp_path / name
        code, output = run_cli("fold", "--base", base, "--adapter", adapter, "--out", out, *extra)
        assert code == 0, output
        check_index(out)
        got = state(out)
        assert set(got) == set(reference_state)
        for key, tensor in got.items():
            assert tensor.dtype == dtype, key
            assert torch.equal(tensor, reference_state[key]), key
        assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    base_index = json.loads((base / SAFE_INDEX).read_text())["weight_map"]
    assert json.loads((tmp_path / "same" / SAFE_INDEX).read_text())["weight_map"] == base_index
    assert len(set(json.loads((tmp_path / "resharded" / SAFE_INDEX).read_text())["weight_map"].values())) > \
        len(set(base_index.values()))

    # transformers loads the sharded output: the same logits as the base with the adapter attached
    folded = load_base(tmp_path / "resharded")
    adapted = load_base(base)
    AdapterSet.load(adapter, adapted).attach(adapted)
    assert (logits(folded, IDS) - logits(adapted, IDS)).abs().max() <= MAX_LOGIT_GAP[dtype]
    assert torch.equal(logits(folded, IDS), logits(load_base(tmp_path / "same"), IDS))


def test_fold_of_a_bin_checkpoint(llama, tmp_path, run_cli):
    """A ``pytorch_model.bin`` base folds into safetensors with the same values."""
    base = resave(llama, tmp_path / "bin", safe=False)
    assert (base / "pytorch_model.bin").is_file() and not list(base.glob("*.safetensors"))
    adapter = make_adapter(base, tmp_path / "pissa", "pissa", targets="q_proj,down_proj")
    code, output = run_cli("fold", "--base", base, "--adapter", adapter, "--out", tmp_path / "folded")
    assert code == 0, output
    reference = load_base(base)
    AdapterSet.load(adapter, reference).fold_into(reference)
    got = state(tmp_path / "folded")
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in got.items()) and len(got) > 10


def test_fold_smollm2_tied_embeddings(tmp_path, run_cli):
    """SmolLM2 ties its head to the embeddings: the fold copies the embedding once, writes no head,
    and the folded model equals the in-memory fold (same weights, same logits, still tied)."""
    from svd_serve.realmodel import smollm2

    base = smollm2()
    model = load_base(base)
    adapter = make_adapter(base, tmp_path / "lora")
    AdapterSet.load(adapter, model).fold_into(model)
    code, output = run_cli("fold", "--base", base, "--adapter", adapter, "--out", tmp_path / "folded",
                           "--max-shard-size", "200MB")
    assert code == 0, output
    check_index(tmp_path / "folded")
    ckpt = Weights(tmp_path / "folded")
    assert "lm_head.weight" not in ckpt and "model.embed_tokens.weight" in ckpt
    folded = load_base(tmp_path / "folded")
    assert folded.lm_head.weight is folded.model.embed_tokens.weight
    for key, tensor in model.state_dict().items():
        assert torch.equal(folded.state_dict()[key], tensor), key
    assert torch.equal(logits(folded, IDS), logits(model, IDS))


def test_merge_export_extract_import_inspect_on_a_sharded_base(llama, tmp_path, run_cli):
    """Every command gives the same result on a sharded copy of a base as on the single file; the
    PEFT export of the sharded base loads in PEFT with the adapted model's logits."""
    import peft

    single = resave(llama, tmp_path / "single", torch.bfloat16)
    sharded = resave(llama, tmp_path / "sharded", torch.bfloat16, max_shard_size="100KB")
    adapters = [make_adapter(single, tmp_path / "a0", "kasa", seed=1),
                make_adapter(single, tmp_path / "a1", targets="v_proj,down_proj", seed=2)]
    finetune = tmp_path / "ft"
    code, output = run_cli("fold", "--base", sharded, "--adapter", adapters[1], "--out", finetune)
    assert code == 0, output
    lora = peft.get_peft_model(load_base(single), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                                  init_lora_weights=False))
    lora.save_pretrained(tmp_path / "peft")
    runs = {
        "merge": ["merge", "--adapter", adapters[0], "--adapter", adapters[1], "--method", "ties",
                  "--density", "0.5", "--fold"],
        "twin": ["merge", "--adapter", adapters[0], "--adapter", adapters[1], "--method", "twin",
                 "--rank", "3"],
        "export": ["export", "--target", "peft", "--adapter", adapters[0]],
        "extract": ["extract", "--finetuned", finetune, "--rank", "3"],
        "import": ["import", "--from", "peft", tmp_path / "peft"],
    }
    for name, args in runs.items():
        for kind, base in (("single", single), ("sharded", sharded)):
            code, output = run_cli(*args, "--base", base, "--out", tmp_path / f"{name}-{kind}")
            assert code == 0, output
        files = sorted(p.relative_to(tmp_path / f"{name}-single")
                       for p in (tmp_path / f"{name}-single").rglob("*.safetensors"))
        assert files, name
        for f in files:
            if name in ("merge", "twin") and f.parts[0] != "adapters":
                continue  # checkpoints: compared below, shard layouts differ
            a, b = load_file(tmp_path / f"{name}-single" / f), load_file(tmp_path / f"{name}-sharded" / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, f)
    for name, sub in (("merge", ""), ("twin", "base")):
        a, b = state(tmp_path / f"{name}-single" / sub), state(tmp_path / f"{name}-sharded" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    check_index(tmp_path / "merge-sharded")

    served = peft.PeftModel.from_pretrained(load_base(sharded), tmp_path / "export-sharded").eval()
    adapted = load_base(sharded)
    AdapterSet.load(adapters[0], adapted).attach(adapted)
    assert (logits(served, IDS) - logits(adapted, IDS)).abs().max() <= MAX_LOGIT_GAP[torch.float32]

    from svd_serve.inspection import inspect

    for a, b in zip(inspect(adapters[0], single), inspect(adapters[0], sharded)):
        assert torch.equal(a.base_sigma, b.base_sigma) and torch.equal(a.adapted_sigma, b.adapted_sigma)


def test_load_base_converts_tensor_by_tensor(tiny_model, tmp_path):
    """load_base of a checkpoint stored in another dtype gives transformers' own conversion, tied
    weights tied, the generation config loaded."""
    from transformers import AutoModelForCausalLM

    from svd_serve.tiny import build_tiny_model

    tied = build_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    qwen = resave(tiny_model("qwen2"), tmp_path / "qwen2", torch.bfloat16)
    for base, dtype in ((tied, torch.bfloat16), (qwen, torch.float32)):
        got = load_base(base, dtype)
        want = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        assert got.dtype == dtype and got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(t, want.state_dict()[k]) for k, t in got.state_dict().items())
        assert torch.equal(logits(got, IDS), logits(want.eval(), IDS))
        assert got.generation_config.to_dict() == want.generation_config.to_dict()
        tied_weights = got.lm_head.weight is got.model.embed_tokens.weight
        assert tied_weights == (base == tied)


# --- a checkpoint larger than the process needs ------------------------------------------------------
# The measured command is started by a bare interpreter: a child's ru_maxrss starts from the RSS
# of the process it is forked from (this one holds torch and models).
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1] + ".log", "w"))
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "peak": usage.ru_maxrss * 1024}, f)
"""


def peak_rss(tmp: Path, *args) -> int:
    """Peak RSS in bytes of ``python ARGS`` (asserts exit status 0)."""
    result = tmp / "rss.json"
    subprocess.run([sys.executable, "-S", "-c", LAUNCHER, result, sys.executable, *map(str, args)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    r = json.loads(result.read_text())
    assert r["rc"] == 0, Path(f"{result}.log").read_text()[-3000:]
    return r["peak"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict:
    """A random bfloat16 Llama of ~700 MB in 9 shards (hidden 1024, MLP 2816, 28 layers), written
    tensor by tensor, and two rank-8 LoRA adapters on q_proj, v_proj and down_proj (the largest)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=28, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, tie_word_embeddings=False)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    base = tmp / "base"
    base.mkdir()
    config.save_pretrained(base)
    plan = shard_by_size({n: 2 * torch.Size(s).numel() for n, s in shapes.items()}, 80 << 20)
    writer = ShardWriter(base, {f: [(n, "BF16", shapes[n]) for n in names] for f, names in plan.items()}, {})
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02)
                     .to(torch.bfloat16))
    writer.close()
    ckpt = Weights(base)
    targets = resolve_targets(ckpt.skeleton, "q_proj,v_proj,down_proj")
    adapters = []
    for i in range(2):
        cfg = AdapterConfig(method="lora", options={"rank": 8, "alpha": 16.0}, target_spec="q_proj,v_proj,down_proj",
                            targets={n: list(ckpt.get_submodule(n).weight.shape) for n in targets},
                            architecture=ckpt.architecture, base_fingerprint=ckpt.fingerprint(targets))
        s = AdapterSet(cfg)
        with torch.no_grad():
            for p in s.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        adapters.append(s.save(tmp / f"task{i}"))
    return {"tmp": tmp, "base": base, "adapters": adapters, "bytes": ckpt.nbytes, "shards": len(plan)}


@pytest.mark.slow
def test_commands_peak_below_the_checkpoint_size(wide):
    """fold, export, merge and extract of a ~700 MB bfloat16 checkpoint each peak below 700 MB,
    although the interpreter with torch and transformers alone takes about half of that; the folded
    and merged outputs are exact, tensor by tensor."""
    tmp, base, adapters, size = wide["tmp"], wide["base"], wide["adapters"], wide["bytes"]
    assert size > 650e6 and wide["shards"] >= 8
    cli = ["-m", "svd_serve"]
    peaks = {
        "fold": peak_rss(tmp, *cli, "fold", "--base", base, "--adapter", adapters[0], "--out", tmp / "folded"),
        "export": peak_rss(tmp, *cli, "export", "--target", "peft", "--base", base, "--adapter", adapters[0],
                           "--out", tmp / "exported"),
        "merge": peak_rss(tmp, *cli, "merge", "--base", base, "--adapter", adapters[0], "--adapter", adapters[1],
                          "--method", "ties", "--density", "0.5", "--fold", "--out", tmp / "merged"),
        "extract": peak_rss(tmp, *cli, "extract", "--base", base, "--finetuned", tmp / "folded", "--rank", "8",
                            "--targets", r"model\.layers\.0\.self_attn\.q_proj", "--out", tmp / "extracted"),
    }
    print({c: f"{p / 1e6:.0f} MB" for c, p in peaks.items()}, f"checkpoint {size / 1e6:.0f} MB")
    for command, peak in peaks.items():
        assert peak < size, f"{command}: peak RSS {peak / 1e6:.0f} MB, checkpoint {size / 1e6:.0f} MB"

    # outputs: exact, read back one tensor at a time
    ckpt, folded, merged = Weights(base), Weights(tmp / "folded"), Weights(tmp / "merged")
    check_index(tmp / "folded")
    sets = [AdapterSet.load(a, ckpt) for a in adapters]
    layers = dict(sets[0].items())
    deltas = [s.deltas() for s in sets]
    for name in ckpt.tensors:
        module = name.removesuffix(".weight")
        want = ckpt.read(name)
        if module in layers:
            add_low_rank_(want, *layers[module].delta())
        assert torch.equal(folded.read(name), want), name
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.5.self_attn.v_proj", "model.layers.27.mlp.down_proj"):
        tau = MERGES["ties"]([d[module].factors for d in deltas], MergeParams(weights=[1.0, 1.0], density=0.5))
        want = (ckpt.weight(module).float() + tau).to(torch.bfloat16)
        assert torch.equal(merged.weight(module), want), module
    for untouched in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "lm_head.weight"):
        assert torch.equal(merged.read(untouched), ckpt.read(untouched))
    assert AdapterSet.load(tmp / "extracted").config.targets == {"model.layers.0.self_attn.q_proj": [1024, 1024]}


def test_load_base_holds_one_copy(wide):
    """Loading the bfloat16 checkpoint in float32 holds the float32 model (2x the checkpoint) and
    little else: measured 2.3x over the imports; transformers' own path also keeps the bfloat16
    file mapped, 3.1x."""
    tmp, size = wide["tmp"], wide["bytes"]
    imports = peak_rss(tmp, "-c", "import svd_serve.weights, svd_serve.model; "
                                  "from transformers import AutoModelForCausalLM")
    loaded = peak_rss(tmp, "-c", f"import torch; from svd_serve.model import load_base; "
                                 f"load_base({str(wide['base'])!r}, torch.float32)")
    assert loaded - imports < 2.6 * size, (imports / 1e6, loaded / 1e6, size / 1e6)


@pytest.mark.vllm
def test_vllm_serves_a_sharded_folded_checkpoint(tmp_path, run_cli):
    """vLLM loads the folded checkpoint from its shards and index: `svd-serve verify` compares its
    greedy tokens and logprobs (the folded base alone and with an adapter) with transformers'."""
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", "llama", head_dim=32)
    adapter = make_adapter(base, tmp_path / "kasa", "kasa", targets="all-linear")
    code, output = run_cli("fold", "--base", base, "--adapter", adapter, "--out", tmp_path / "folded",
                           "--max-shard-size", "100KB")
    assert code == 0, output
    check_index(tmp_path / "folded")
    second = make_adapter(tmp_path / "folded", tmp_path / "pissa", "pissa", seed=3)
    code, output = run_cli("export", "--target", "vllm", "--base", tmp_path / "folded", "--adapter", second,
                           "--out", tmp_path / "exp")
    assert code == 0, output
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "HF_HOME": str(tmp_path / "hf"), "TMPDIR": str(scratch), "VLLM_RPC_BASE_PATH": str(scratch),
           "TORCH_COMPILE_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base",
                          str(tmp_path / "folded"), "--export", str(tmp_path / "exp"), "--max-new-tokens", "8",
                          "--kv-cache-mib", "64", "--json", str(tmp_path / "verify.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["ok"] and set(report["checks"]) == {"(base)", "pissa"}
    assert all(c["ok"] and c["tokens_match"] for c in report["checks"].values())
