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
from .hub import resolve
from .model import check_base_dir
from .verification import (BASE, PROMPTS, TOLERANCE, TOP_K, Runs, Verification, VerifyOptions, check_fingerprint,
                           compare, engine, greedy, prepare, report, root_cause)

__all__ = ["BASE", "PROMPTS", "TOLERANCE", "TOP_K", "Runs", "Verification", "VerifyOptions", "check_fingerprint",
           "compare", "engine", "greedy", "prepare", "report", "root_cause", "verify", "verify_served"]


def verify(target: str, base: str | Path, export_dir: str | Path, prompts: list[str] | None = None,
           max_new_tokens: int = VerifyOptions.max_new_tokens, tol: float | None = None,
           kv_cache_mib: int = VerifyOptions.kv_cache_mib, revision: str | None = None) -> Verification:
    """Check the export at ``export_dir`` in ``target``'s runtime on ``base`` (a local directory or a
    Hugging Face Hub id at ``revision``, :mod:`svd_serve.hub`)."""
    t = get_target(target)
    options = VerifyOptions(list(prompts) if prompts else list(PROMPTS), max_new_tokens, tol, kv_cache_mib)
    base = check_base_dir(resolve(base, revision).path)
    if not Path(export_dir).is_dir():
        raise SvdServeError(f"export directory not found: {export_dir}")
    return t.verify(base, Path(export_dir), options)


def verify_served(target: str, base: str | Path, export_dirs: list[str | Path], served_base: str | Path,
                  options: VerifyOptions | None = None):
    """Serve the exports at ``export_dirs`` in ``target``'s runtime on the quantized ``served_base`` and
    compare with the full-precision ``base`` with each adapter's exact ΔW
    (:func:`svd_serve.verify_served.verify_served`)."""
    from .verify_served import verify_served as run

    base = check_base_dir(base)
    for d in export_dirs:
        if not Path(d).is_dir():
            raise SvdServeError(f"export directory not found: {d}")
    return run(target, base, [Path(d) for d in export_dirs], Path(served_base), options or VerifyOptions())
