"""``svd-serve verify --target T``: run an export in its target's own runtime (vLLM, ONNX Runtime,
PEFT) and check, for the base and each adapter, that greedy tokens and their logprobs equal those of
the Hugging Face model with the same exported factors applied.

This module only dispatches: each target implements its check in its own file (``Target.verify``),
from the shared pieces in :mod:`svd_serve.verification` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path

from .converters import get_target
from .errors import SvdServeError
from .model import check_base_dir
from .verification import (BASE, PROMPTS, TOLERANCE, TOP_K, Runs, Verification, VerifyOptions, check_fingerprint,
                           compare, engine, greedy, prepare, report, root_cause)

__all__ = ["BASE", "PROMPTS", "TOLERANCE", "TOP_K", "Runs", "Verification", "VerifyOptions", "check_fingerprint",
           "compare", "engine", "greedy", "prepare", "report", "root_cause", "verify"]


def verify(target: str, base: str | Path, export_dir: str | Path, prompts: list[str] | None = None,
           max_new_tokens: int = VerifyOptions.max_new_tokens, tol: float | None = None,
           kv_cache_mib: int = VerifyOptions.kv_cache_mib) -> Verification:
    """Check the export at ``export_dir`` in ``target``'s runtime on ``base``."""
    t = get_target(target)
    options = VerifyOptions(list(prompts) if prompts else list(PROMPTS), max_new_tokens, tol, kv_cache_mib)
    base = check_base_dir(base)  # a local directory, never a model hub name
    if not Path(export_dir).is_dir():
        raise SvdServeError(f"export directory not found: {export_dir}")
    return t.verify(base, Path(export_dir), options)
