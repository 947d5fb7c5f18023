"""Prefill and per-token decode latency: ONNX Runtime base vs ORT with an active adapter vs torch eager.

    python bench/onnx_latency.py [--hidden 256 --layers 4 --rank 8 --prompt 32 --steps 32 --threads 2]
    python bench/onnx_latency.py --base "$(python scripts/smollm2.py)" [--adapter DIR] --repeat 8

Toy (default): a tiny random Llama and an all-linear LoRA adapter with perturbed tensors. With
``--base``: that model and a real adapter (``--adapter``, or LoRA on every linear layer trained for a
few steps on short chat rows by ``svd-serve train``). Both are exported with ``--target onnx``
(float32, CPU) and each path is timed in one process. Reports medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import BASE_HELP, describe, load_line, trained_adapter  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ort_paths(out: Path, ids: np.ndarray, steps: int, repeat: int, threads: int, adapter: str):
    """One session; base and adapter runs interleaved, so machine load hits both alike.
    Returns {"ort base": (prefill, decode), "ort + adapter": (...)} in ms, and the provider."""
    import onnxruntime as ort

    from svd_serve.converters.onnx import check_adapter, prefill_feed, session_options

    opts = session_options()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(check_adapter(out, adapter)))
    paths = {"ort base": ort.RunOptions(), "ort + adapter": ort.RunOptions()}
    paths["ort + adapter"].add_active_adapter(lora)
    names = [o.name for o in sess.get_outputs()]
    feed = prefill_feed(out, sess, ids)

    def prefill(run_opts):
        t = time.perf_counter()
        sess.run(None, feed, run_opts)
        return time.perf_counter() - t

    def decode(run_opts):
        result = dict(zip(names, sess.run(None, feed, run_opts)))
        total = ids.shape[1]
        t = time.perf_counter()
        for _ in range(steps):
            total += 1
            step = {"input_ids": result["logits"][:, -1:].argmax(-1).astype(np.int64),
                    "attention_mask": np.ones((1, total), np.int64)}
            step.update({k.replace("present", "past_key_values"): v for k, v in result.items()
                         if k.startswith("present")})
            result = dict(zip(names, sess.run(None, step, run_opts)))
        return (time.perf_counter() - t) / steps

    times = {name: ([], []) for name in paths}
    for i in range(repeat + 1):
        for name, run_opts in paths.items():
            pre, dec = prefill(run_opts), decode(run_opts)
            if i:  # the first round warms up
                times[name][0].append(pre)
                times[name][1].append(dec)
    rows = {name: (1e3 * statistics.median(p), 1e3 * statistics.median(d)) for name, (p, d) in times.items()}
    return rows, sess.get_providers()[0]


@torch.no_grad()
def torch_paths(model, ids: np.ndarray, steps: int, repeat: int):
    from transformers import DynamicCache

    x = torch.from_numpy(ids)
    prefill = median_ms(lambda: model(input_ids=x, use_cache=True), repeat)

    def decode():
        cache = DynamicCache()
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        return 1e3 * (time.perf_counter() - t) / steps

    decode()
    return prefill, statistics.median(decode() for _ in range(3))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument("--adapter", help="with --base: an svd-serve adapter of it (default: LoRA trained for a few steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.export import export
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.base:
            base, what = Path(args.base), describe(Path(args.base))
            adapter = Path(args.adapter) if args.adapter else trained_adapter(base, tmp / "adapter", rank=args.rank)
            model = load_base(base)
            adapters = AdapterSet.load(adapter, model)
        else:
            base = build_tiny_model(tmp / "base", "llama", hidden_size=args.hidden,
                                    intermediate_size=2 * args.hidden, num_hidden_layers=args.layers)
            what = f"toy {describe(base)} (random weights)"
            model = load_base(base)
            adapters = AdapterSet.create(model, "lora", make_options("lora", rank=args.rank),
                                         resolve_targets(model, "all-linear"), progress=False)
            with torch.no_grad():
                for q in adapters.parameters():
                    q.add_(0.05 * torch.randn_like(q))
            adapter = adapters.save(tmp / "adapter")
        export("onnx", base, [adapter], tmp / "onnx", dtype="float32", verify=False)

        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.prompt))
        rows, provider = ort_paths(tmp / "onnx", ids, args.steps, args.repeat, args.threads, adapter.name)
        rows["torch eager base"] = torch_paths(model, ids, args.steps, max(1, args.repeat // 4))
        adapters.attach(model)
        rows["torch eager + adapter"] = torch_paths(model, ids, args.steps, max(1, args.repeat // 4))

    print(f"{what}; adapter {adapters.config.method} r={adapters.config.options.get('rank')} on "
          f"{len(adapters.config.targets)} linears; prompt {args.prompt}, {args.steps} decode steps, "
          f"{args.threads} threads, ORT on {provider}; {load_line()}")
    print(f"{'path':24s} {'prefill ms':>11s} {'decode ms/token':>16s}")
    for name, (pre, dec) in rows.items():
        print(f"{name:24s} {pre:11.3f} {dec:16.3f}")
    (bp, bd), (ap, ad) = rows["ort base"], rows["ort + adapter"]
    overhead = {"prefill": ap / bp - 1, "decode": ad / bd - 1}
    print(f"adapter overhead in ORT: prefill {100 * overhead['prefill']:+.1f} %, "
          f"decode {100 * overhead['decode']:+.1f} % (goal: <= 10 %)")
    print(json.dumps({"provider": provider, "ms": rows, "overhead": overhead}))


if __name__ == "__main__":
    main()
