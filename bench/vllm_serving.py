"""vLLM serving cost of exported adapters: output tokens/s for the base, the folded model, and 1, 2
and 4 exported adapters mixed in one batch, as ratios to the base (float32, CPU or GPU).

    python bench/vllm_serving.py [--hidden 256 --layers 4 --rank 8 --requests 16 --tokens 64]
    python bench/vllm_serving.py --base "$(python scripts/smollm2.py)" [--adapter DIR] --requests 8 --tokens 32

Toy (default): a small random Llama, four perturbed KaSA adapters on every linear layer and one plain
LoRA of the KaSA adapters' exported rank (2r), exported with ``svd-serve export --target vllm``, the
first KaSA adapter also folded. With ``--base``: that model and a real adapter (``--adapter``, or KaSA
trained for a few steps on short chat rows by ``svd-serve train``), exported and folded, against the
base; no mixing rows (one adapter). Everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from benchlib import BASE_HELP, describe, load_line


def real_models(tmp: Path, base: Path, adapter: Path | None, rank: int) -> tuple[Path, Path, dict]:
    """``--base``: the model, its adapter (given or briefly trained) exported for vLLM, and folded."""
    from benchlib import trained_adapter

    from svd_serve.export import export
    from svd_serve.fold import fold

    # KaSA's published init breaks a real model (svd-serve train refuses it): its activation-aware form
    adapter = adapter or trained_adapter(base, tmp / "adapters" / "kasa0", method="kasa", rank=rank,
                                         options={"select": "activation"})
    export("vllm", base, [adapter], tmp / "exp", verify=False)
    folded = fold(base, adapter, tmp / "folded")
    return base, folded, json.loads((tmp / "exp" / "serve.json").read_text())


def make_models(tmp: Path, hidden: int, layers: int, rank: int, n_adapters: int) -> tuple[Path, Path, dict]:
    import torch

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.export import export
    from svd_serve.fold import fold
    from svd_serve.model import load_base, resolve_targets
    from svd_serve.tiny import build_tiny_model

    base = build_tiny_model(tmp / "base", "llama", hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            num_key_value_heads=hidden // 64, head_dim=64)
    model = load_base(base)
    targets = resolve_targets(model, "all-linear")
    dirs = []
    # n_adapters KaSA adapters (exported at rank 2r), then one plain LoRA of rank 2r to compare with
    specs = [("kasa", rank)] * n_adapters + [("lora", 2 * rank)]
    for i, (method, r) in enumerate(specs):
        s = AdapterSet.create(model, method, make_options(method, rank=r), targets, progress=False)
        with torch.no_grad():
            for p in s.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        dirs.append(s.save(tmp / "adapters" / (f"kasa{i}" if method == "kasa" else "lora")))
    export("vllm", base, dirs, tmp / "exp", verify=False)
    folded = fold(base, dirs[0], tmp / "folded")
    return base, folded, json.loads((tmp / "exp" / "serve.json").read_text())


def throughput(llm, prompts: list[list[int]], loras: list, tokens: int, repeats: int = 2) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:2], SamplingParams(max_tokens=4), lora_request=loras[:2], use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(batch, params, lora_request=loras, use_tqdm=False)
        dt = time.perf_counter() - t
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--base", help=BASE_HELP)
    ap.add_argument("--adapter", help="with --base: an svd-serve adapter of it (default: KaSA trained for a few steps)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.base:
            base, folded, serve = real_models(tmp, Path(args.base), Path(args.adapter) if args.adapter else None,
                                              args.rank)
            lora, what = None, describe(base)
        else:
            base, folded, serve = make_models(tmp, args.hidden, args.layers, args.rank, 4)
            lora = serve["adapters"].pop("lora")
            what = f"toy {describe(base)} (random weights)"
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        prompts = [[(7 * i + j) % min(300, vocab - 6) + 6 for j in range(args.prompt_len)] for i in range(args.requests)]
        common = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20,
                      max_model_len=args.prompt_len + args.tokens, seed=0)
        none = [None] * args.requests
        results = {}
        for name, path in (("base", base), ("folded", folded)):
            llm = LLM(model=str(path), **common)
            results[name] = throughput(llm, prompts, none, args.tokens)
            del llm
            gc.collect()
        llm = LLM(model=str(base), enable_lora=True, max_lora_rank=serve["max_lora_rank"],
                  max_loras=serve["max_loras"], **common)
        reqs = [LoRARequest(n, i + 1, a["path"]) for i, (n, a) in enumerate(serve["adapters"].items())]
        results["base, LoRA enabled"] = throughput(llm, prompts, none, args.tokens)
        if lora:
            plain = LoRARequest("lora", len(reqs) + 1, lora["path"])
            results[f"1 plain LoRA r={lora['rank']}"] = throughput(llm, prompts, [plain] * args.requests, args.tokens)
        first = next(iter(serve["adapters"].values()))
        results[f"1 adapter, exported r={first['rank']}"] = throughput(llm, prompts, [reqs[0]] * args.requests,
                                                                        args.tokens)
        for k in (1, 2, 4) if len(reqs) >= 4 else ():
            loras = [reqs[i % k] for i in range(args.requests)]
            results[f"{k} adapter{'s' if k > 1 else ''} mixed"] = throughput(llm, prompts, loras, args.tokens)
        del llm
        gc.collect()

    print(f"\n{what}; adapters of rank {serve['max_lora_rank']} on every linear; "
          f"{args.requests} requests x {args.tokens} tokens; {load_line()}")
    for name, tps in results.items():
        print(f"{name:26s} {tps:9.1f} tok/s   {tps / results['base']:.2f} x base")


if __name__ == "__main__":
    main()
