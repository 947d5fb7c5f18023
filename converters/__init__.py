"""Export targets: adding a target is one file in this folder plus one line in ``TARGETS``.

A converter receives an :class:`ExportJob` — each adapter's exact ΔW factors against the original
base, already in their smallest exact rank (or truncated to ``--max-rank``) — and writes files.
Converters never see method internals.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from svd_serve.errors import SvdServeError


@dataclass
class ExportedAdapter:
    name: str  # the adapter directory's name; output names derive from it
    path: Path
    config: dict  # the native svd_adapter.json
    A: dict[str, Tensor]  # module name -> [rank, in]
    B: dict[str, Tensor]  # module name -> [out, rank]
    rel_error: dict[str, float]  # module name -> relative Frobenius error (0.0 when exact)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a in self.A.values())


@dataclass
class ExportJob:
    base: Path
    adapters: list[ExportedAdapter]
    linear_modules: list[str]  # every nn.Linear of the base, for target_modules
    architecture: str
    model_type: str
    options: dict = field(default_factory=dict)  # target-specific options from the CLI
    model: Any = None  # the base model (float32) when the caller has it loaded already
    overwrite: bool = False  # replace an earlier svd-serve output at ``out`` (never anything else)


# target name -> "module:function"; modules are imported only when their target is used
TARGETS: dict[str, str] = {
    "peft": "svd_serve.converters.peft:export",
    "vllm": "svd_serve.converters.vllm:export",
    "onnx": "svd_serve.converters.onnx:export",
}


def get_target(name: str) -> Callable[[ExportJob, Path], dict]:
    if name not in TARGETS:
        raise SvdServeError(f"unknown export target {name!r}; choose one of: {', '.join(TARGETS)}")
    module, func = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), func)
