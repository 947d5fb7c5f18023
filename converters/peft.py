"""PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``), and the one place
that knows how a PEFT reader scales them (:func:`scale`, :func:`read_lora`).

Every module is written at the same rank R (the largest exact rank; smaller ones padded with zero
components) and ``lora_alpha = R``, so the scale is exactly 1 and no ``rank_pattern`` /
``alpha_pattern`` is needed: PEFT, vLLM and any other LoRA reader agree on the result. vLLM pads
every adapter to ``--max-lora-rank`` anyway, so the padding costs nothing there. Only config fields
vLLM accepts are written; what svd-serve needs to check the export later (the base fingerprint the
adapter was made for, its source) goes to :data:`RECORD` beside them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from svd_serve.converters import ExportedAdapter, ExportJob, Target, adapter_hash, read_json
from svd_serve.errors import SvdServeError
from svd_serve.files import atomic_dir
from svd_serve.linalg import LowRank
from svd_serve.verification import BASE, engine, greedy, prepare, report

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
RECORD = "svd_serve_export.json"
RECORD_FORMAT = "svd-serve-lora-export"


def target_modules(modules: list[str], all_linear: list[str]) -> list[str]:
    """Leaf names (``q_proj``) where the adapter covers every module of that name, else full names."""
    covered = set(modules)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    out = []
    for leaf in leaves:
        same = [n for n in all_linear if n.rsplit(".", 1)[-1] == leaf]
        if all(n in covered for n in same):
            out.append(leaf)
        else:
            out += sorted(n for n in modules if n.rsplit(".", 1)[-1] == leaf)
    return out


def lora_tensors(adapter: ExportedAdapter, rank: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in adapter.A:
        a, b = adapter.A[name], adapter.B[name]
        pad = rank - a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    return tensors


def lora_config(adapter: ExportedAdapter, job: ExportJob, rank: int) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(job.base),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": target_modules(list(adapter.A), job.linear_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_record(adapter: ExportedAdapter, job: ExportJob | None = None) -> dict:
    """What ``verify`` checks an export against: the fingerprint of the base the adapter was made
    for (over the modules it adapts) and where it came from; with ``job``, the base as it was named
    and resolved (a Hub id: its revision and snapshot commit)."""
    source = Path(adapter.path)
    native = all((source / f).is_file() for f in ("svd_adapter.json", "svd_adapter.safetensors"))
    return {"format": RECORD_FORMAT, "format_version": 1, "name": adapter.name,
            "base_fingerprint": adapter.config.get("base_fingerprint"), "method": adapter.config.get("method"),
            "source": str(source.resolve()), "source_hash": adapter_hash(source) if native else None,
            "rank": adapter.rank, "max_rel_error": max(adapter.rel_error.values()),
            **({"served_base": adapter.served} if adapter.served else {}),
            **({"base_source": job.base_source} if job is not None and job.base_source else {})}


def write_lora_dir(adapter: ExportedAdapter, job: ExportJob, out: Path, overwrite: bool = False) -> dict:
    rank = adapter.rank
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG).write_text(json.dumps(lora_config(adapter, job, rank), indent=2) + "\n")
        save_file(lora_tensors(adapter, rank), tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / RECORD).write_text(json.dumps(export_record(adapter, job), indent=2) + "\n")
    return {"path": str(out), "rank": rank}


# --- reading: how PEFT (and vLLM) interpret a LoRA directory ----------------------------------------
def pattern_value(pattern: dict | None, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the
    module name (``(.*\\.)?(KEY)$``), else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale(config: dict, module: str) -> float:
    """The factor a PEFT reader puts on ``B A`` for ``module``: ``alpha / r``, or ``alpha / √r`` with
    rsLoRA, with ``r`` and ``alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` where they match."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def read_config(lora_dir: str | Path) -> dict:
    return read_json(Path(lora_dir) / CONFIG, f"{lora_dir} is not a PEFT LoRA directory: no {CONFIG}")


def read_lora(lora_dir: str | Path) -> dict[str, LowRank]:
    """Each module's ``ΔW = scale · B A`` as a PEFT reader applies it (scale folded into B)."""
    config = read_config(lora_dir)
    try:
        tensors = load_file(Path(lora_dir) / WEIGHTS)
    except Exception as e:  # missing, truncated or corrupt file
        raise SvdServeError(f"cannot read {Path(lora_dir) / WEIGHTS}: {str(e).splitlines()[0]}") from None
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise SvdServeError(f"{lora_dir}: module {module} has lora_A but no lora_B")
            out[module] = LowRank(a.float(), b.float() * scale(config, module))
    if not out:
        raise SvdServeError(f"{lora_dir}: {WEIGHTS} holds no LoRA tensors")
    return out


def read_record(lora_dir: str | Path) -> dict:
    record = read_json(Path(lora_dir) / RECORD, f"{lora_dir} has no {RECORD}: it was not written by this "
                       "svd-serve, so its base cannot be checked; export the adapter again")
    if record.get("format") != RECORD_FORMAT:
        raise SvdServeError(f"{Path(lora_dir) / RECORD}: not an svd-serve export record")
    return record


class PeftTarget(Target):
    name = "peft"
    help = "one PEFT LoRA directory (PeftModel.from_pretrained on the unmodified base)"

    def export(self, job: ExportJob, out: Path) -> dict:
        """One adapter → one PEFT directory at ``out``."""
        if len(job.adapters) != 1:
            raise SvdServeError(f"--target peft writes one adapter per directory; got {len(job.adapters)}: "
                                "export them one at a time, or use --target vllm")
        (adapter,) = job.adapters
        return {adapter.name: write_lora_dir(adapter, job, out, job.overwrite)}

    def verify(self, base: Path, export_dir: Path, options):
        """PEFT's model (``PeftModel.from_pretrained``) against the Hugging Face model with the same
        factors as svd-serve reads them: PEFT is the independent reader of the written files."""
        record = read_record(export_dir)
        factors = read_lora(export_dir)
        name = record["name"]
        model, ids, ref = prepare(base, {name: factors}, [(f"adapter {name}", record["base_fingerprint"], list(factors))],
                                  options)
        with engine("PEFT") as log:
            try:
                from peft import PeftModel
            except ImportError:
                raise SvdServeError("PEFT is not installed: pip install peft") from None
            import peft

            peft_model = PeftModel.from_pretrained(model, str(export_dir)).eval()
            got = {name: [greedy(peft_model, i, options.max_new_tokens) for i in ids]}
            with peft_model.disable_adapter():
                got[BASE] = [greedy(peft_model, i, options.max_new_tokens) for i in ids]
        return report(self.name, f"PEFT {peft.__version__} (float32)", ref, got, options, "float32", log)
