"""vLLM: one PEFT LoRA directory per adapter on the unmodified base, ``serve.json``, and the command
line that serves them all from one base.

Everything vLLM would reject at load time (or, worse, load and serve wrongly) is refused here,
before anything is written: an architecture without LoRA support in vLLM, modules vLLM does not map
to a LoRA layer, a rank above vLLM's largest ``--max-lora-rank``. vLLM itself is not imported: the
architecture list below is static, and a test checks it against the installed vLLM.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from svd_serve.converters import ExportedAdapter, ExportJob
from svd_serve.converters.peft import write_lora_dir
from svd_serve.errors import SvdServeError
from svd_serve.io import atomic_dir

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

# Mixed batches on vLLM's CPU backend: a request without LoRA gets the LoRA in the last slot
# (vllm-project/vllm#48421), so one slot more than there are adapters keeps that slot empty.
SPARE_SLOTS = 1


def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that is ≥ ``rank``."""
    for r in MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise SvdServeError(f"rank {rank} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}; "
                        f"export with --max-rank {MAX_LORA_RANKS[-1]} or less")


def check_servable(architecture: str, adapters: list[ExportedAdapter]) -> None:
    """Raise :class:`SvdServeError` for anything vLLM would reject or serve wrongly."""
    allowed = LORA_MODULES.get(architecture)
    if allowed is None:
        raise SvdServeError(f"vLLM has no LoRA support for {architecture}; supported: "
                            f"{', '.join(sorted(LORA_MODULES))}")
    for a in adapters:
        if not a.name or any(c.isspace() or c in "=/\\" for c in a.name):
            raise SvdServeError(f"adapter name {a.name!r} cannot be served: use a directory name "
                                "without spaces, '=' or slashes")
        bad = sorted(m for m in a.A if m.rsplit(".", 1)[-1] not in allowed)
        if bad:
            raise SvdServeError(f"adapter {a.name}: vLLM has no LoRA layer for module(s) "
                                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} of {architecture} "
                                f"(it maps: {', '.join(sorted(allowed))})")
        try:
            max_lora_rank(a.rank)
        except SvdServeError as e:
            raise SvdServeError(f"adapter {a.name}: {e}") from None


def serve_command(base: Path, paths: dict[str, Path], rank: int, slots: int) -> list[str]:
    cmd = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(slots), "--lora-modules"]
    return cmd + [f"{name}={path}" for name, path in paths.items()]


def export(job: ExportJob, out: Path) -> dict:
    """``out/<adapter name>/`` (PEFT LoRA) per adapter, ``out/serve.json``; returns the report."""
    check_servable(job.architecture, job.adapters)
    out = Path(out)
    base = job.base.resolve()
    final = {a.name: out.resolve() / a.name for a in job.adapters}
    rank = max_lora_rank(max(a.rank for a in job.adapters))
    slots = len(job.adapters) + SPARE_SLOTS
    cmd = serve_command(base, final, rank, slots)
    written = {}
    with atomic_dir(out, overwrite=job.overwrite) as tmp:
        for a in job.adapters:
            written[a.name] = {**write_lora_dir(a, job, tmp / a.name), "path": str(final[a.name])}
        serve = {
            "base": str(base), "architecture": job.architecture, "max_lora_rank": rank, "max_loras": slots,
            "adapters": {a.name: {"path": str(final[a.name]), "rank": a.rank, "rel_error": a.rel_error}
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
