"""vLLM export, serve-time loading and verification, against the installed vLLM.

One offline engine (``svd-serve verify``, a subprocess) and one OpenAI-compatible server per module;
the server starts first so that both start-ups overlap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import free_port, make_adapter, one_error, scratch_env, stop_server, wait_healthy

from svd_serve.adapter import AdapterSet
from svd_serve.converters import ExportedAdapter, ExportJob
from svd_serve.converters import vllm as conv
from svd_serve.converters import vllm_plugin as plugin
from svd_serve.errors import SvdServeError
from svd_serve.model import load_base
from svd_serve.verify import PROMPTS, greedy

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A vLLM-loadable tiny Llama (CPU attention needs head_dim ≥ 32), KaSA + PiSSA adapters, export."""
    from svd_serve.export import export
    from svd_serve.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("vllm")
    base = build_tiny_model(tmp / "base", "llama", head_dim=32)
    model = load_base(base)
    root = tmp / "root"
    adapters = [make_adapter(base, root / "kasa", "kasa", targets="all-linear", seed=1, scale=0.1),
                make_adapter(base, root / "pissa", "pissa", targets="all-linear", seed=2, scale=0.1)]
    report = export("vllm", base, adapters, tmp / "exp")
    return {"tmp": tmp, "base": base, "root": root, "adapters": adapters, "exp": tmp / "exp",
            "report": report, "model": model}


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.strip().startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def serving(setup, tokenizer_ids):
    """Starts the server, runs the offline check meanwhile, then waits for the server."""
    tmp, exp = setup["tmp"], setup["exp"]
    env = scratch_env(tmp)
    port = free_port()
    log = open(tmp / "server.log", "w")
    # the two engines run at the same time: give each its own core
    server_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": "1",
                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "svd_serve",
                  plugin.ROOT_ENV: str(setup["root"])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(setup["base"]),
         "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--max-cpu-loras", "8",
         "--max-model-len", "128", "--kv-cache-memory-bytes", str(64 << 20),
         "--lora-modules", f"kasa-static={exp / 'kasa'}"],
        env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "svd_serve", "verify", "--target", "vllm", "--base", str(setup["base"]),
             "--export", str(exp), "--max-new-tokens", str(MAX_TOKENS), "--kv-cache-mib", "64",
             "--json", str(tmp / "verify.json")],
            env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0", "SVD_SERVE_LOG": str(tmp / "verify.log")},
            capture_output=True, text=True, timeout=400)
        offline = {"code": out.returncode, "stdout": out.stdout, "stderr": out.stderr,
                   "output": out.stdout + out.stderr[-3000:], "log": tmp / "verify.log"}
        if out.returncode in (0, 1):
            offline["report"] = json.loads((tmp / "verify.json").read_text())["checks"]
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, tmp / "server.log")
        yield {"url": url, "offline": offline, "log": tmp / "server.log", "ids": tokenizer_ids}
    finally:
        stop_server(proc)
        log.close()


@pytest.fixture(scope="module")
def tokenizer_ids(setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["base"])
    return [tok(p)["input_ids"] for p in PROMPTS]


def complete(url: str, model: str, ids: list[int]) -> tuple[int, dict]:
    return post(url + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS,
                                          "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})


def tokens_of(url: str, model: str, ids: list[int]) -> list[int]:
    code, body = complete(url, model, ids)
    assert code == 200, body
    return body["choices"][0]["token_ids"]


# --- export -------------------------------------------------------------------------------------

def test_export_layout_and_command(setup, run_cli, tmp_path):
    code, out = run_cli("export", "--target", "vllm", "--base", setup["base"],
                        *sum((["--adapter", a] for a in setup["adapters"]), []), "--out", tmp_path / "e")
    assert code == 0, out
    serve = json.loads((tmp_path / "e" / "serve.json").read_text())
    ranks = [serve["adapters"][n]["rank"] for n in ("kasa", "pissa")]
    assert serve["max_lora_rank"] == conv.max_lora_rank(max(ranks)) and serve["max_loras"] == 2  # every slot taken: no spare slot for base requests
    line = next(l for l in out.splitlines() if l.startswith("python -m vllm.entrypoints.openai.api_server"))
    assert "--max-loras 2" in line and f"--max-lora-rank {serve['max_lora_rank']}" in line
    assert f"kasa={tmp_path.resolve() / 'e' / 'kasa'}" in line
    for name, r in zip(("kasa", "pissa"), ranks):
        cfg = json.loads((tmp_path / "e" / name / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == r and cfg["init_lora_weights"] is True


def test_export_truncated_reports_errors(setup, run_cli, tmp_path):
    code, out = run_cli("export", "--target", "vllm", "--base", setup["base"], "--adapter",
                        setup["adapters"][0], "--out", tmp_path / "e", "--max-rank", "2")
    assert code == 0, out
    serve = json.loads((tmp_path / "e" / "serve.json").read_text())
    errors = serve["adapters"]["kasa"]["rel_error"]
    assert serve["adapters"]["kasa"]["rank"] == 2 and len(errors) == 14 and min(errors.values()) > 0
    assert "largest error" in out and serve["max_lora_rank"] == 8 and serve["max_loras"] == 1


def fake_job(arch="LlamaForCausalLM", module="model.layers.0.self_attn.q_proj", rank=4, name="a"):
    a = ExportedAdapter(name=name, path=Path(name), config={}, A={module: torch.zeros(rank, 3)},
                        B={module: torch.zeros(5, rank)}, rel_error={module: 0.0})
    return ExportJob(base=Path("base"), adapters=[a], linear_modules=[module], architecture=arch,
                     model_type="x")


@pytest.mark.parametrize("job, message", [
    (fake_job(arch="GPT2LMHeadModel", module="transformer.h.0.attn.c_attn"), "no LoRA support for GPT2LMHeadModel"),
    (fake_job(module="model.layers.0.mlp.fc1"), "no LoRA layer for module(s) model.layers.0.mlp.fc1"),
    (fake_job(module="lm_head"), "ties lm_head to the input embeddings"),  # no config: taken as tied
    (fake_job(rank=513), "above vLLM's largest --max-lora-rank 512"),
    (fake_job(name="a=b"), "cannot be served"),
])
def test_export_refuses_what_vllm_rejects(job, message, tmp_path):
    with pytest.raises(SvdServeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        conv.export(job, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_max_lora_rank_values():
    assert [conv.max_lora_rank(r) for r in (1, 2, 8, 9, 257, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    with pytest.raises(SvdServeError):
        conv.max_lora_rank(513)


@pytest.mark.vllm
def test_allow_list_matches_installed_vllm():
    from vllm.config.lora import MaxLoRARanks
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    assert tuple(sorted(int(r) for r in MaxLoRARanks.__args__)) == conv.MAX_LORA_RANKS
    for arch, modules in conv.LORA_MODULES.items():
        cls = ModelRegistry._try_load_model_cls(arch)
        assert cls is not None and supports_lora(cls), arch
        packed = {m for names in getattr(cls, "packed_modules_mapping", {}).values() for m in names}
        assert packed <= modules | {"experts", "w1", "w2", "w3"}, (arch, packed - modules)


# --- offline engine and server --------------------------------------------------------------------

def folded_tokens(setup, ids_list, adapter: Path | None) -> list[list[int]]:
    model = load_base(setup["base"])
    if adapter is not None:
        AdapterSet.load(adapter, model).fold_into(model)
    return [greedy(model, ids, MAX_TOKENS)[0] for ids in ids_list]


@pytest.mark.vllm
def test_offline_mixed_batch_matches_folded_models(setup, serving):
    offline = serving["offline"]
    assert offline["code"] == 0, offline["output"]
    # quiet: the summary table on stdout, the engine's output in the log
    lines = offline["stdout"].splitlines()
    assert lines[0].startswith("verify --target vllm: vLLM ") and lines[-1] == "all 3 match", offline["stdout"]
    assert len(lines) <= 10 and "INFO" not in offline["stdout"] + offline["stderr"], offline["output"]
    assert "Initializing a V1 LLM engine" in offline["log"].read_text()
    report = offline["report"]
    assert set(report) == {"(base)", "kasa", "pissa"} and all(r["ok"] for r in report.values())
    base_tokens = folded_tokens(setup, serving["ids"], None)
    assert report["(base)"]["tokens"] == base_tokens
    for adapter in setup["adapters"]:
        tokens = report[adapter.name]["tokens"]
        assert tokens == folded_tokens(setup, serving["ids"], adapter)
        assert tokens != base_tokens  # the adapter is really applied


@pytest.mark.vllm
def test_server_static_dynamic_and_resolved(setup, serving):
    url, ids, expected = serving["url"], serving["ids"], serving["offline"]["report"]
    assert [tokens_of(url, "base", i) for i in ids] == expected["(base)"]["tokens"]
    assert [tokens_of(url, "kasa-static", i) for i in ids] == expected["kasa"]["tokens"]
    code, body = post(url + "/v1/load_lora_adapter", {"lora_name": "pissa-dyn",
                                                      "lora_path": str(setup["exp"] / "pissa")})
    assert code == 200, body
    assert [tokens_of(url, "pissa-dyn", i) for i in ids] == expected["pissa"]["tokens"]
    # the resolver: native adapters by name, several first requests at once
    results = {}

    def ask(k):
        results[k] = tokens_of(url, "pissa", ids[k % len(ids)])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[k] for k in range(4)] == [expected["pissa"]["tokens"][k % len(ids)] for k in range(4)]
    assert [tokens_of(url, "kasa", i) for i in ids] == expected["kasa"]["tokens"]
    assert serving["log"].read_text().count("svd-serve: converted adapter pissa") == 1


@pytest.mark.vllm
def test_server_base_requests_right_with_every_slot_taken(setup, serving):
    """One LoRA slot, four adapters (an export by --lora-modules, two native ones through the plugin, one
    loaded at run time): base and adapter requests at once, so that base requests share batches with
    adapter requests while the slot is taken. Every answer is its own model's, the base's too."""
    url, ids, expected = serving["url"], serving["ids"], serving["offline"]["report"]
    want = {"base": expected["(base)"]["tokens"], "kasa-static": expected["kasa"]["tokens"],
            "kasa": expected["kasa"]["tokens"], "pissa": expected["pissa"]["tokens"]}
    jobs = [(name, k) for _ in range(3) for name in want for k in range(len(ids))]
    results = {}

    def ask(j):
        name, k = jobs[j]
        results[j] = tokens_of(url, name, ids[k])

    threads = [threading.Thread(target=ask, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = [jobs[j] for j in range(len(jobs)) if results.get(j) != want[jobs[j][0]][jobs[j][1]]]
    assert not wrong, wrong
    assert "corrected in this process" in serving["log"].read_text()


@pytest.mark.vllm
def test_server_resolver_refuses_escapes_and_survives_corrupt(setup, serving):
    url, ids, tmp = serving["url"], serving["ids"], setup["tmp"]
    outside = tmp / "outside"
    shutil.copytree(setup["adapters"][0], outside / "secret", dirs_exist_ok=True)
    escape = setup["root"] / "escape"
    if not escape.exists():
        escape.symlink_to(outside / "secret")
    for name in ("../outside/secret", str(outside / "secret"), "escape", "missing"):
        code, body = complete(url, name, ids[0])
        assert code == 404, (name, body)
    broken = setup["root"] / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "svd_adapter.json").write_text("{not json")
    (broken / "svd_adapter.safetensors").write_bytes(b"garbage")
    code, body = complete(url, "broken", ids[0])
    assert code == 400 and "'broken'" in body["error"]["message"] and "is corrupt" in body["error"]["message"], body
    assert tokens_of(url, "base", ids[0]) == serving["offline"]["report"]["(base)"]["tokens"][0]
    assert not any("secret" in p.name or "escape" in p.name for p in (tmp / "vllm-cache" / "svd_serve_lora").glob("*"))


# --- resolver and verify units ----------------------------------------------------------------------

def test_adapter_dir_stays_inside_root(setup, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(setup["adapters"][1], root / "good")
    shutil.copytree(setup["adapters"][1], tmp_path / "outside")
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "in").symlink_to(root / "good")
    assert plugin.adapter_dir(root, "good") == (root / "good").resolve()
    assert plugin.adapter_dir(root, "in") == (root / "good").resolve()
    for name in ("..", ".", "", "../outside", str(tmp_path / "outside"), "out", "good/..", "missing"):
        assert plugin.adapter_dir(root, name) is None, name


def test_concurrent_conversions_run_once(setup, tmp_path, monkeypatch):
    calls = []
    real = plugin.write_peft
    monkeypatch.setattr(plugin, "write_peft", lambda *a: (calls.append(a), time.sleep(0.3), real(*a)))
    src = setup["adapters"][0]
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(plugin.convert(src, tmp_path, "kasa", None)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(outs)) == 1
    peft = json.loads((outs[0] / "adapter_config.json").read_text())
    assert peft["r"] == json.loads((setup["exp"] / "kasa" / "adapter_config.json").read_text())["r"]
    assert plugin.convert(src, tmp_path, "kasa", str(setup["base"])) == outs[0] and len(calls) == 1


def test_conversion_checks_the_served_base(setup, tmp_path):
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=7, head_dim=32)
    with pytest.raises(SvdServeError, match="different base"):
        plugin.convert(setup["adapters"][0], tmp_path / "cache", "kasa", str(other))
    assert not list((tmp_path / "cache").glob("kasa-*"))
    out = plugin.convert(setup["adapters"][0], tmp_path / "cache", "kasa", str(setup["base"]))
    assert (out / "adapter_model.safetensors").is_file()


def test_register_is_light_and_off_without_root(tmp_path):
    code = ("import sys; from svd_serve.converters import vllm_plugin as p; p.register(); "
            "print(sorted(m for m in ('vllm.lora.resolver', 'transformers', 'svd_serve.adapter', 'svd_serve.export') "
            "if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != plugin.ROOT_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_register_corrects_the_cpu_lora_ops(tmp_path):
    """Registration corrects the LoRA ops with or without an adapter root (exports served by
    --lora-modules need it too); the resolver is registered only with a root."""
    code = ("from svd_serve.converters import vllm_plugin as p; p.register(); "
            "from vllm.lora.ops.torch_ops import lora_ops; print(lora_ops.bgmv_expand.svd_serve_fixed)")
    env = {k: v for k, v in os.environ.items() if k != plugin.ROOT_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_verify_needs_an_export(setup, run_cli, tmp_path):
    code, out = run_cli("verify", "--target", "vllm", "--base", setup["base"], "--export", tmp_path)
    one_error(code, out, "not a vLLM export")


def test_verify_refuses_another_base(setup, run_cli, tmp_path):
    """vLLM and the HF reference on the same wrong base would agree: the base is checked first."""
    from svd_serve.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=7, head_dim=32)
    code, out = run_cli("verify", "--target", "vllm", "--base", other, "--export", setup["exp"])
    one_error(code, out, "adapter kasa was made for another base", str(other))


def test_verify_refuses_a_missing_base_at_once(setup, run_cli, tmp_path):
    code, out = run_cli("verify", "--target", "vllm", "--base", tmp_path / "nope", "--export", setup["exp"])
    one_error(code, out, "base model directory not found")


@pytest.mark.vllm
def test_verify_refuses_a_head_dim_the_engine_rejects(run_cli, tmp_path, capfd):
    """head_dim 16 fails in vLLM's CPU worker with pages of tracebacks: refused before the engine starts."""
    from svd_serve.export import export
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", "llama")  # head_dim 16
    adapter = make_adapter(base, tmp_path / "lora", targets="all-linear", seed=3, scale=0.1)
    export("vllm", base, [adapter], tmp_path / "exp")
    capfd.readouterr()
    code, out = run_cli("verify", "--target", "vllm", "--base", base, "--export", tmp_path / "exp")
    one_error(code, out, "vLLM's CPU attention cannot run", "head_dim 16 is not one of 32, 64")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err and len((captured.out + captured.err).splitlines()) <= 2


def test_plugin_conversion_does_not_use_the_export_command(setup, tmp_path):
    code = ("import sys; from pathlib import Path; from svd_serve.converters import vllm_plugin as p; "
            f"p.convert(Path({str(setup['adapters'][0])!r}), Path({str(tmp_path)!r}), 'kasa', None); "
            "print('svd_serve.export' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- verify --url: a running server against the Hugging Face model -----------------------------------

def verify_url(run_cli, serving, setup, tmp_path, *args) -> tuple[int, str, dict | None]:
    code, out = run_cli("verify", "--url", serving["url"], "--base", setup["base"], "--max-new-tokens", MAX_TOKENS,
                        "--json", tmp_path / "v.json", *args)
    return code, out, json.loads((tmp_path / "v.json").read_text()) if code in (0, 1) else None


@pytest.mark.vllm
def test_verify_url_static_export(setup, serving, run_cli, tmp_path):
    code, out, report = verify_url(run_cli, serving, setup, tmp_path, "--adapter", f"kasa-static={setup['exp'] / 'kasa'}")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"verify --url {serving['url']}: vllm server, base model 'base'"), out
    assert "float32" in lines[1] and lines[-1] == "all 2 match", out
    checks = report["checks"]
    assert set(checks) == {"(base)", "kasa-static"} and all(c["result"] == "ok" for c in checks.values())
    assert checks["kasa-static"]["tokens"] == folded_tokens(setup, serving["ids"], setup["adapters"][0])
    assert checks["(base)"]["tokens"] == folded_tokens(setup, serving["ids"], None) != checks["kasa-static"]["tokens"]
    assert 0 < checks["kasa-static"]["max_logprob_gap"] <= report["tol"]


@pytest.mark.vllm
def test_verify_url_native_adapters(setup, serving, run_cli, tmp_path):
    root = setup["root"]
    code, out, report = verify_url(run_cli, serving, setup, tmp_path, "--adapter", f"kasa={root / 'kasa'}",
                                   "--adapter", f"pissa={root / 'pissa'}")
    assert code == 0, out
    assert out.splitlines()[-1] == "all 3 match", out
    checks = report["checks"]
    for adapter in setup["adapters"]:
        assert checks[adapter.name]["result"] == "ok"
        assert checks[adapter.name]["tokens"] == folded_tokens(setup, serving["ids"], adapter)


@pytest.mark.vllm
def test_verify_url_wrong_mapping_mismatches(setup, serving, run_cli, tmp_path):
    code, out, report = verify_url(run_cli, serving, setup, tmp_path, "--adapter", f"kasa={setup['root'] / 'pissa'}")
    assert code == 1, out
    checks = report["checks"]
    assert checks["kasa"]["result"] == "mismatch" and not report["ok"], out
    assert checks["(base)"]["result"] == "ok", out
    assert out.splitlines()[-1] == "MISMATCH: kasa", out


@pytest.mark.vllm
def test_verify_url_unknown_adapter(setup, serving, run_cli, tmp_path):
    code, out, _ = verify_url(run_cli, serving, setup, tmp_path, "--adapter", f"nope={setup['root'] / 'kasa'}")
    one_error(code, out, "the server does not serve adapter nope (404")


def test_verify_url_classifies_rows():
    """Fake server outputs: an adapter answering as the base, a wrong base, base requests with an adapter."""
    from svd_serve.verification import BASE, compare
    from svd_serve.verify_server import ServerVerification, classify

    def runs(*token_lists):
        return [(t, [-1.0] * len(t)) for t in token_lists]

    ref = {BASE: runs([1, 2], [3, 4]), "a": runs([5, 6], [3, 4]), "b": runs([7, 8], [9, 9])}

    def judge(got):
        checks = {n: {**compare(ref[n], got[n], 1e-3), "tokens": [r[0] for r in got[n]]} for n in ref}
        classify(ref, got, checks, 1e-3, "BASE")
        return checks

    ignored = judge({BASE: ref[BASE], "a": ref[BASE], "b": ref["b"]})
    assert [ignored[n]["result"] for n in ref] == ["ok", "silently ignored", "ok"]
    wrong = judge({BASE: runs([2, 2], [3, 4]), "a": ref["a"], "b": ref["b"]})
    assert wrong[BASE]["result"] == "not the adapters' base" and "BASE" in wrong[BASE]["why"]
    carried = judge({BASE: runs([1, 2], [9, 9]), "a": ref["a"], "b": ref["b"]})
    assert carried[BASE]["result"] == "adapter applied to base requests" and "adapter b" in carried[BASE]["why"]
    loose = judge({BASE: ref[BASE], "a": [(t, [-1.5] * 2) for t, _ in ref["a"]], "b": ref["b"]})
    assert loose["a"]["result"] == "mismatch" and "--dtype" in loose["a"]["why"]
    lines = ServerVerification("url", "x server", "ref", 1e-3, 2, 2, ignored, None, "http://h", "float32").lines()
    assert lines[5].endswith("MISMATCH: silently ignored") and lines[-1] == "MISMATCH: a", lines
    assert any(l.startswith("a: the server's answers equal its base answers") for l in lines), lines


def test_verify_url_input_errors(setup, run_cli, tmp_path):
    kasa = setup["root"] / "kasa"
    base = ("verify", "--base", setup["base"])
    code, out = run_cli(*base, "--url", f"http://127.0.0.1:{free_port()}", "--adapter", f"kasa={kasa}")
    one_error(code, out, "cannot reach http://127.0.0.1:")
    code, out = run_cli(*base, "--url", "127.0.0.1:8000")
    one_error(code, out, "give an http:// or https:// address")
    code, out = run_cli(*base, "--url", "http://127.0.0.1:1", "--adapter", "kasa")
    one_error(code, out, "give NAME=DIR")
    code, out = run_cli(*base, "--url", "http://127.0.0.1:1", "--adapter", f"other={setup['exp']}")
    one_error(code, out, "is a vLLM export of kasa, pissa, not of other")
    code, out = run_cli(*base, "--url", "http://127.0.0.1:1", "--target", "vllm", "--export", setup["exp"])
    one_error(code, out, "drop --target")
    code, out = run_cli(*base, "--adapter", f"kasa={kasa}", "--target", "vllm", "--export", setup["exp"])
    one_error(code, out, "--adapter is for checking a server: give --url too")
    code, out = run_cli(*base, "--export", setup["exp"])
    one_error(code, out, "Missing option '--target'")


def test_verify_url_server_answers(tmp_path):
    """A fake server: which listed model is the base, answers without token ids, HTTP errors."""
    import http.server

    from svd_serve.verify_server import Server

    answers = {"/v1/models": (200, {"data": [{"id": "b1"}, {"id": "a", "parent": "b1"}]}),
               "/v1/completions": (200, {"choices": [{"text": "x", "logprobs": {"token_logprobs": [-0.5]}}]})}

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            code, body = answers[self.path]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = Server(f"http://127.0.0.1:{httpd.server_address[1]}/v1/")
        assert server.base_name() == ("b1", "OpenAI-compatible")
        answers["/v1/models"] = (200, {"data": [{"id": "b1"}, {"id": "b2", "owned_by": "x"}]})
        with pytest.raises(SvdServeError, match=r"listed: b1, b2\): give --served-base-name"):
            server.base_name()
        with pytest.raises(SvdServeError, match="has no token ids with logprobs"):
            server.complete("a", [1, 2], 1, "adapter a")
        answers["/v1/completions"] = (200, {"choices": [{"logprobs": {"token_logprobs": [-0.5, -0.25],
                                                                     "tokens": ["token_id:7", "token_id:9"]}}]})
        assert server.complete("a", [1, 2], 2, "adapter a") == ([7, 9], [-0.5, -0.25])
        answers["/v1/completions"] = (500, {"error": {"message": "engine died\ntraceback"}})
        with pytest.raises(SvdServeError, match="the server answered 500 for adapter a: engine died$"):
            server.complete("a", [1, 2], 2, "adapter a")
        answers["/v1/models"] = (200, ["b1"])
        with pytest.raises(SvdServeError, match="did not answer a JSON object"):
            server.base_name()
    finally:
        httpd.shutdown()
        httpd.server_close()
