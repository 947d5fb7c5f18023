"""Quiet by default: what libraries and engines print (vLLM's engine logs, ONNX Runtime warnings,
transformers' weight-loading bars) goes to a log file; ``svd-serve -v`` shows it instead.

svd-serve's own lines (results, notes, one progress bar per long phase) are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

_verbose = False


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on
    if not on:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


def verbose() -> bool:
    return _verbose


def log_path() -> Path:
    """``$SVD_SERVE_LOG``, else ``svd-serve.log`` in the svd-serve cache directory."""
    if os.environ.get("SVD_SERVE_LOG"):
        return Path(os.environ["SVD_SERVE_LOG"])
    from .realmodel import cache_root

    return cache_root() / "svd-serve.log"


@contextlib.contextmanager
def quiet(what: str):
    """Send everything written to this process's stdout/stderr file descriptors (and so by any
    engine subprocess it starts) to :func:`log_path` while the block runs, unless verbose; yields
    the log's path (None when verbose), which error messages should name."""
    if _verbose:
        yield None
        return
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what} (pid {os.getpid()}) ===\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
