"""Native adapters under load on the vLLM OpenAI server: throughput and p50/p95 latency of many
concurrent requests mixing the base and N adapters, against the same adapters exported and given with
``--lora-modules``, and against the base alone (float32, CPU or GPU).

    python bench/vllm_load.py [--adapters 6 --max-loras 2 --requests 48 --tokens 16]
    python bench/vllm_load.py --base "$(python scripts/smollm2.py)" --requests 24

Three servers, one after the other, on the same R requests over a few prompts (token ids, greedy,
``ignore_eos``), all sent at once by the ``openai`` client:
(a) native svd-serve adapters resolved by name through the plugin (``SVD_SERVE_ADAPTER_ROOT``);
(b) the same adapters exported by ``svd-serve export --target vllm`` and given with ``--lora-modules``;
(c) the base alone, every request to the base. Each server answers one request per model first
(warm-up; for (a) this converts every adapter), which is not timed. N perturbed adapters of different
methods on every linear layer; everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import BASE_HELP, base_model, load_line

METHODS = ["lora", "pissa", "milora", "olora", "sorsa"]


def make_adapters(base: Path, out: Path, n: int, rank: int, scale: float) -> list[Path]:
    """``n`` adapters of the methods in turn, every trainable tensor moved off its init."""
    import torch

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.model import load_base, resolve_targets

    model = load_base(base)
    targets = resolve_targets(model, "all-linear")
    dirs = []
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        s = AdapterSet.create(model, method, make_options(method, rank=rank), targets, "all-linear",
                              base_model=str(base), progress=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in s.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g))
        dirs.append(s.save(out / f"{method}{i}"))
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An OpenAI-compatible vLLM server on loopback, its output in ``log``."""

    def __init__(self, base: Path, log: Path, args: list[str], env: dict):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
               "--dtype", "float32", "--enforce-eager", *args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log.name}")
            if time.time() > deadline:
                raise SystemExit(f"the server did not start; see {self.log.name}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                return self
            except OSError:
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def timed(client, model: str, ids: list[int], tokens: int) -> tuple[float, int]:
    t = time.perf_counter()
    out = await client.completions.create(model=model, prompt=ids, max_tokens=tokens, temperature=0.0,
                                          extra_body={"ignore_eos": True})
    return time.perf_counter() - t, out.usage.completion_tokens


async def load(url: str, jobs: list[tuple[str, list[int]]], tokens: int) -> dict:
    """Warm-up (one request per model), then every job at once: requests/s, tokens/s, latencies."""
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=1800) as client:
        first = {m: ids for m, ids in jobs}
        await asyncio.gather(*(timed(client, m, ids, 2) for m, ids in first.items()))
        t = time.perf_counter()
        done = await asyncio.gather(*(timed(client, m, ids, tokens) for m, ids in jobs))
        wall = time.perf_counter() - t
    lat = sorted(d for d, _ in done)
    return {"req/s": len(done) / wall, "tok/s": sum(n for _, n in done) / wall,
            "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help=BASE_HELP)
    ap.add_argument("--adapters", type=int, default=6, help="number of adapters (default 6)")
    ap.add_argument("--max-loras", type=int, default=2, help="vLLM LoRA slots (default 2)")
    ap.add_argument("--requests", type=int, default=48, help="concurrent requests per run (default 48)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request (default 16)")
    ap.add_argument("--prompts", type=int, default=3, help="distinct prompts (default 3)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.01, help="size of the random perturbation of the adapters")
    args = ap.parse_args()

    from svd_serve.converters import vllm_plugin
    from svd_serve.export import export

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base, what = base_model(args.base, tmp, head_dim=32)
        dirs = make_adapters(base, tmp / "root", args.adapters, args.rank, args.scale)
        export("vllm", base, dirs, tmp / "exp", verify=False)
        serve = json.loads((tmp / "exp" / "serve.json").read_text())
        names = [p.name for p in dirs]
        vocab = int(json.loads((base / "config.json").read_text())["vocab_size"])
        prompts = [[(7 * i + j) % min(300, vocab - 6) + 6 for j in range(args.prompt_len)]
                   for i in range(args.prompts)]
        models = ["base", *names]
        mixed = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(args.requests)]
        common = ["--max-model-len", str(args.prompt_len + args.tokens + 16),
                  "--kv-cache-memory-bytes", str(512 << 20)]
        lora = ["--enable-lora", "--max-lora-rank", str(serve["max_lora_rank"]), "--max-loras", str(args.max_loras),
                "--max-cpu-loras", str(max(args.max_loras, len(names)))]
        runs = {
            "(a) native, plugin": (lora, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "svd_serve",
                                          vllm_plugin.ROOT_ENV: str(tmp / "root"),
                                          vllm_plugin.CACHE_ENV: str(tmp / "cache")}, mixed),
            "(b) exported, --lora-modules": (
                lora + ["--lora-modules", *(f"{n}={tmp / 'exp' / n}" for n in names)], {}, mixed),
            "(c) base alone": ([], {}, [("base", p) for _, p in mixed]),
        }
        results = {}
        for i, (label, (flags, env, jobs)) in enumerate(runs.items()):
            with Server(base, tmp / f"server{i}.log", common + flags, {"HF_HUB_OFFLINE": "1", **env}) as srv:
                results[label] = asyncio.run(load(srv.url, jobs, args.tokens))
            print(f"{label}: done", file=sys.stderr)

    print(f"\n{what}; {args.adapters} adapters ({', '.join(METHODS[:args.adapters])}...) of exported rank "
          f"<= {serve['max_lora_rank']} on every linear, --max-loras {args.max_loras}; {args.requests} concurrent "
          f"requests x {args.tokens} tokens over {args.prompts} prompts, base and adapters mixed; {load_line()}")
    print(f"{'run':30s} {'req/s':>7s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>7s}")
    for label, r in results.items():
        print(f"{label:30s} {r['req/s']:7.2f} {r['tok/s']:8.1f} {r['p50']:7.2f} {r['p95']:7.2f}")
    a, b, c = results.values()
    for other, r in (("(b)", b), ("(c)", c)):
        print(f"(a)/{other}: throughput {a['tok/s'] / r['tok/s']:.2f}, p50 {a['p50'] / r['p50']:.2f}, "
              f"p95 {a['p95'] / r['p95']:.2f}")


if __name__ == "__main__":
    main()
