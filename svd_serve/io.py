"""Atomic outputs: everything is written to a temporary sibling and renamed when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import SvdServeError


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``,
    on any error it is removed and ``out`` is left as it was."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdServeError(f"cannot create {out.parent}: {e.strerror}") from None
    if out.exists() and not out.is_dir():
        raise SvdServeError(f"{out} exists and is not a directory")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise SvdServeError(f"output directory {out.parent} is not writable ({e.strerror or e})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
