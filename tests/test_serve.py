"""``svd-serve serve``: the vLLM command it computes from an adapter root, its refusals, and one real
server start and stop."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from helpers import free_port, make_adapter, one_error, scratch_env
from svd_serve.converters import ExportedAdapter
from svd_serve.converters.vllm_plugin import ROOT_ENV

from svd_serve.adapter import AdapterSet
from svd_serve.model import load_base
from svd_serve.serve import served_rank
from svd_serve.verify import greedy

MAX_TOKENS = 4
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
               "--max-model-len", "128"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A vLLM-loadable tiny Llama and a root of 3 native adapters (one of rank 12: bucket 16)."""
    from svd_serve.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("serve")
    base = build_tiny_model(tmp / "base", "llama", head_dim=32)
    root = tmp / "root"
    make_adapter(base, root / "kasa", "kasa", targets="all-linear", seed=1, scale=0.1)
    make_adapter(base, root / "lora", "lora", seed=2, scale=0.1)
    make_adapter(base, root / "wide", "lora", rank=12, seed=3, scale=0.1)
    (root / "notes").mkdir()  # not an adapter: ignored
    return {"tmp": tmp, "base": base, "root": root}


def dry_run(run_cli, setup, *args) -> tuple[dict, list[str]]:
    code, out = run_cli("serve", "--base", setup["base"], "--adapter-root", setup["root"], "--dry-run", *args)
    assert code == 0, out
    lines = out.strip().splitlines()
    env = dict(line.split("=", 1) for line in lines[:-1])
    return env, shlex.split(lines[-1])


def value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, cmd
    return cmd[cmd.index(flag) + 1]


def test_dry_run_command_and_env(setup, run_cli):
    env, cmd = dry_run(run_cli, setup)
    assert env.pop(ROOT_ENV) == str(setup["root"].resolve())
    assert env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"
    assert env == ({"VLLM_PLUGINS": f"{os.environ['VLLM_PLUGINS']},svd_serve"}
                   if "svd_serve" not in os.environ.get("VLLM_PLUGINS", "svd_serve").split(",") else {})
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert value(cmd, "--model") == str(setup["base"].resolve())
    assert value(cmd, "--served-model-name") == "base"
    assert (value(cmd, "--host"), value(cmd, "--port"), value(cmd, "--dtype")) == ("127.0.0.1", "8000", "auto")
    assert cmd.count("--enable-lora") == 1
    assert value(cmd, "--max-lora-rank") == "16"  # the rank-12 adapter
    assert value(cmd, "--max-loras") == "3" and value(cmd, "--max-cpu-loras") == "3"
    if torch.cuda.is_available():  # vLLM's own default
        assert "--gpu-memory-utilization" not in cmd
    else:  # what fits the RAM free now
        util = float(value(cmd, "--gpu-memory-utilization"))
        mem = psutil.virtual_memory()
        assert 0 < util * mem.total <= mem.available


def test_rank_bound_holds_the_exported_rank(setup):
    """The cheap bound that picks --max-lora-rank is never below what the plugin's conversion exports."""
    for path in sorted(setup["root"].glob("*/svd_adapter.json")):
        adapters = AdapterSet.load(path.parent)
        exported = ExportedAdapter.from_adapter(path.parent.name, path.parent, adapters)
        assert exported.rank <= served_rank(adapters), path.parent.name


def test_overrides_by_option_and_after_dashdash(setup, run_cli):
    _, cmd = dry_run(run_cli, setup, "--max-loras", "2", "--max-lora-rank", "32", "--port", "9001",
                     "--served-model-name", "tiny", "--gpu-memory-utilization", "0.2")
    assert (value(cmd, "--max-loras"), value(cmd, "--max-cpu-loras"), value(cmd, "--max-lora-rank")) == ("2", "3", "32")
    assert (value(cmd, "--port"), value(cmd, "--served-model-name")) == ("9001", "tiny")
    assert value(cmd, "--gpu-memory-utilization") == "0.2"
    _, cmd = dry_run(run_cli, setup, "--", "--max-lora-rank=64", "--dtype", "float32", "--gpu-memory-utilization",
                     "0.3", "--enforce-eager")
    assert not any(a.startswith("--max-lora-rank") for a in cmd[:-6]), cmd
    assert cmd[-6:] == ["--max-lora-rank=64", "--dtype", "float32", "--gpu-memory-utilization", "0.3",
                        "--enforce-eager"]
    assert cmd.count("--dtype") == 1 and cmd.count("--gpu-memory-utilization") == 1


def test_bad_inputs(setup, run_cli, tmp_path):
    base, root = setup["base"], setup["root"]

    def refused(*args, needle):
        code, out = run_cli("serve", *args, "--dry-run")
        one_error(code, out, needle)

    refused("--base", tmp_path / "nope", "--adapter-root", root, needle="base model directory not found")
    refused("--base", base, "--adapter-root", tmp_path / "nope", needle="adapter root not found")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    refused("--base", base, "--adapter-root", tmp_path / "empty", needle="holds no native svd-serve adapter")
    refused("--base", base, "--adapter-root", root, "--max-lora-rank", "8", needle="below the rank of adapter wide (12)")
    # an architecture vLLM has no LoRA for
    other = tmp_path / "arch"
    other.mkdir()
    (other / "a").mkdir()
    cfg = json.loads((root / "lora" / "svd_adapter.json").read_text())
    (other / "a" / "svd_adapter.json").write_text(json.dumps({**cfg, "architecture": "GPT2LMHeadModel"}))
    (other / "a" / "svd_adapter.safetensors").write_bytes((root / "lora" / "svd_adapter.safetensors").read_bytes())
    refused("--base", base, "--adapter-root", other, needle="adapter a: vLLM has no LoRA support for GPT2LMHeadModel")
    # an adapter of another base
    from svd_serve.tiny import build_tiny_model

    base2 = build_tiny_model(tmp_path / "base2", "llama", head_dim=32, seed=7)
    refused("--base", base2, "--adapter-root", root, needle="different base")


def test_a_server_that_dies_is_one_error_with_its_cause(tmp_path):
    """Before it is ready: the root cause from the log, the log's path, nothing left running."""
    from svd_serve.errors import SvdServeError
    from svd_serve.serve import ServePlan, run

    script = "import sys; print('Traceback (most recent call last):'); print('ValueError: no such model'); sys.exit(3)"
    plan = ServePlan([sys.executable, "-c", script], {}, tmp_path, tmp_path, {}, "127.0.0.1", free_port())
    with pytest.raises(SvdServeError) as e:
        run(plan, tmp_path / "serve.log", timeout=60)
    assert str(e.value) == f"vLLM exited before it was ready (exit code 3): ValueError: no such model (log: {tmp_path / 'serve.log'})"


# --- one real start -----------------------------------------------------------------------------


def completion(url: str, model: str, ids: list[int]) -> list[int]:
    body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    req = urllib.request.Request(url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def reference(base: Path, ids: list[int], adapter: Path | None) -> list[int]:
    model = load_base(base)
    if adapter is not None:
        AdapterSet.load(adapter, model).fold_into(model)
    return greedy(model, ids, MAX_TOKENS)[0]


@pytest.mark.vllm
def test_serve_starts_answers_and_stops(setup, tmp_path):
    from transformers import AutoTokenizer

    base, root = setup["base"], setup["root"]
    ids = AutoTokenizer.from_pretrained(base)("The capital of France is")["input_ids"]
    env = {**scratch_env(tmp_path), "VLLM_CPU_OMP_THREADS_BIND": "0", "SVD_SERVE_LOG": str(tmp_path / "serve.log")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "svd_serve", "serve", "--base", str(base), "--adapter-root",
                             str(root), "--port", str(port), "--timeout", "400", "--", *SERVER_ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        line = proc.stdout.readline()
        log = (tmp_path / "serve.log").read_text() if (tmp_path / "serve.log").is_file() else ""
        assert line.startswith(f"serving {base.resolve()} with 3 adapters from {root} at "
                               f"http://127.0.0.1:{port}/v1 (log: {tmp_path / 'serve.log'}"), line + log[-3000:]
        assert ("--gpu-memory-utilization" in line) == (not torch.cuda.is_available())  # the CPU's memory share
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the server and its engine process
        url = f"http://127.0.0.1:{port}/v1"
        assert completion(url, "base", ids) == reference(base, ids, None)
        got = completion(url, "kasa", ids)
        assert got == reference(base, ids, root / "kasa")
        assert got != reference(base, ids, None)  # the adapter is really applied
        log = (tmp_path / "serve.log").read_text()
        assert "svd-serve: converted adapter kasa" in log  # the engine's output went to the log
        assert "Traceback" not in line and "INFO" not in line  # engine logs go to the log file
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert rest.strip().splitlines()[-1] == "stopped", rest
        time.sleep(0.5)
        assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in children:
            if c.is_running():
                os.kill(c.pid, signal.SIGKILL)
