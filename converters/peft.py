"""PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Every module is written at the same rank R (the largest exact rank; smaller ones padded with zero
components) and ``lora_alpha = R``, so the scale is exactly 1 and no ``rank_pattern`` /
``alpha_pattern`` is needed: PEFT, vLLM and any other LoRA reader agree on the result. vLLM pads
every adapter to ``--max-lora-rank`` anyway, so the padding costs nothing there. Only config fields
vLLM accepts are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from svd_serve.converters import ExportedAdapter, ExportJob
from svd_serve.io import atomic_dir

PREFIX = "base_model.model."


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


def write_lora_dir(adapter: ExportedAdapter, job: ExportJob, out: Path, overwrite: bool = False) -> dict:
    rank = adapter.rank
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(lora_config(adapter, job, rank), indent=2) + "\n")
        save_file(lora_tensors(adapter, rank), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"path": str(out), "rank": rank}


def export(job: ExportJob, out: Path) -> dict:
    """One adapter → one PEFT directory at ``out``."""
    (adapter,) = job.adapters
    return {adapter.name: write_lora_dir(adapter, job, out, job.overwrite)}
