"""Native adapters under load on a real vLLM OpenAI server: more adapters than LoRA slots, many
concurrent requests from the ``openai`` client, hostile and corrupt names, first-use conversion and
an adapter retrained in place while served.

One server for the module: a tiny Llama, ``--max-loras 2 --max-cpu-loras 2`` (adapters are evicted
from both caches all the time), the plugin's adapter root and its own conversion cache.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import urllib.request

import openai
import pytest
from helpers import digest, folded, free_port, make_adapter, scratch_env, stop_server, wait_healthy

from svd_serve.converters import vllm_plugin as plugin
from svd_serve.verification import PROMPTS, greedy

MAX_TOKENS = 8
METHODS = ["lora", "pissa", "milora", "olora", "kasa", "sorsa"]  # the served set, one adapter each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base, the root (6 adapters, ``late`` for first use, ``retrain`` to overwrite, ``broken``
    truncated, ``escape`` a symlink out of the root), ``donor`` outside it, expected tokens of each."""
    from transformers import AutoTokenizer

    from svd_serve.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("vllm_load")
    base = build_tiny_model(tmp / "base", "llama", head_dim=32)
    root, outside = tmp / "root", tmp / "outside"
    dirs = {m: make_adapter(base, root / m, m, targets="all-linear", seed=i + 1, scale=0.1)
            for i, m in enumerate(METHODS)}
    dirs["late"] = make_adapter(base, root / "late", "lora", targets="all-linear", seed=11, scale=0.1)
    dirs["retrain"] = make_adapter(base, root / "retrain", "lora", targets="all-linear", seed=12, scale=0.1)
    dirs["donor"] = make_adapter(base, outside / "donor", "lora", targets="all-linear", seed=13, scale=0.1)
    shutil.copytree(dirs["lora"], root / "broken")
    weights = root / "broken" / "svd_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "escape").symlink_to(dirs["donor"])
    tok = AutoTokenizer.from_pretrained(base)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    expected = {name: [greedy(folded(base, d), i, MAX_TOKENS)[0] for i in ids] for name, d in dirs.items()}
    expected["base"] = [greedy(folded(base), i, MAX_TOKENS)[0] for i in ids]
    return {"tmp": tmp, "base": base, "root": root, "dirs": dirs, "ids": ids, "expected": expected,
            "digest": digest(root), "cache": tmp / "lora-cache"}


def test_every_adapter_changes_the_greedy_text(setup):
    expected = setup["expected"]
    for name in [*METHODS, "late", "retrain", "donor"]:
        assert expected[name] != expected["base"], name
    assert expected["retrain"] != expected["donor"]


@pytest.fixture(scope="module")
def server(setup):
    tmp = setup["tmp"]
    port = free_port()
    env = {**scratch_env(tmp), "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_PLUGINS": "svd_serve", plugin.ROOT_ENV: str(setup["root"]), plugin.CACHE_ENV: str(setup["cache"])}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(setup["base"]),
         "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
         "--max-cpu-loras", "2", "--max-model-len", "128", "--kv-cache-memory-bytes", str(64 << 20)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, tmp / "server.log")
        yield {"url": url, "log": tmp / "server.log"}
    finally:
        stop_server(proc)
        log.close()


async def ask(client: openai.AsyncOpenAI, model: str, ids: list[int]) -> list[int]:
    out = await client.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0.0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    return out.choices[0].model_extra["token_ids"]


def answers(server, jobs: list[tuple[str, list[int]]]) -> list[list[int]]:
    """The tokens the server answers to every (model, prompt ids) job, all sent at once."""
    async def run():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="-", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(ask(client, m, ids) for m, ids in jobs))

    return asyncio.run(run())


def unload(server, name: str) -> int:
    req = urllib.request.Request(server["url"] + "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def conversions(setup, server, name: str) -> tuple[int, int]:
    """Cache entries of adapter ``name`` and the server's log lines of their conversion."""
    lines = [l for l in server["log"].read_text().splitlines() if f"converted adapter {name} to" in l]
    return len(list(setup["cache"].glob(f"{name}-*"))), len(lines)


@pytest.mark.vllm
def test_concurrent_first_requests_convert_once(setup, server):
    ids, want = setup["ids"], setup["expected"]["late"]
    got = answers(server, [("late", ids[k % 3]) for k in range(9)])
    assert got == [want[k % 3] for k in range(9)]
    assert conversions(setup, server, "late") == (1, 1)


@pytest.mark.vllm
def test_mixed_load_more_adapters_than_slots(setup, server):
    """48 requests at once over 3 prompts, base and 6 adapters mixed with 2 slots: every answer is its
    own folded model's greedy text, the base's included."""
    ids, expected = setup["ids"], setup["expected"]
    jobs = [(name, k) for _ in range(3) for name in ["base", *METHODS] for k in range(3)][:48]
    random.Random(0).shuffle(jobs)
    got = answers(server, [(name, ids[k]) for name, k in jobs])
    wrong = [(name, k) for (name, k), tokens in zip(jobs, got) if tokens != expected[name][k]]
    assert not wrong, wrong
    assert all(conversions(setup, server, m)[0] == 1 for m in METHODS)


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["..", "../outside/donor", "ABSOLUTE", "escape", "nope", "lora/..", "."])
def test_hostile_and_unknown_names_are_404(setup, server, name):
    name = str(setup["dirs"]["donor"]) if name == "ABSOLUTE" else name
    with pytest.raises(openai.NotFoundError):
        answers(server, [(name, setup["ids"][0])])


@pytest.mark.vllm
def test_corrupt_adapter_is_400_and_the_others_still_served(setup, server):
    with pytest.raises(openai.BadRequestError, match="svd-serve adapter 'broken': cannot read"):
        answers(server, [("broken", setup["ids"][0])])
    ids, expected = setup["ids"], setup["expected"]
    jobs = [(name, k) for name in ("base", "lora", "kasa") for k in range(3)]
    assert answers(server, [(n, ids[k]) for n, k in jobs]) == [expected[n][k] for n, k in jobs]


@pytest.mark.vllm
def test_retrained_in_place_is_picked_up_after_unload(setup, server):
    """The server keeps the version it resolved first (also after LRU eviction, which reloads the
    converted copy) until POST /v1/unload_lora_adapter; the next request converts the new files."""
    ids, expected, root = setup["ids"], setup["expected"], setup["root"]
    old, new = expected["retrain"], expected["donor"]
    assert answers(server, [("retrain", i) for i in ids]) == old
    assert digest(root) == setup["digest"]
    for f in setup["dirs"]["donor"].iterdir():  # retrained in place: new files, same name
        shutil.copyfile(f, root / "retrain" / f.name)
    setup["digest"] = digest(root)
    assert answers(server, [("retrain", i) for i in ids]) == old
    answers(server, [(m, ids[0]) for m in METHODS])  # evicts it from the GPU slots and the CPU cache
    assert answers(server, [("retrain", i) for i in ids]) == old
    assert unload(server, "retrain") == 200
    assert answers(server, [("retrain", i) for i in ids]) == new
    assert conversions(setup, server, "retrain") == (2, 2)


@pytest.mark.vllm
def test_adapter_root_never_written(setup, server):
    assert digest(setup["root"]) == setup["digest"]
