"""Safe outputs: nothing half-written, nothing of the user's replaced or deleted without asking.

- Every output directory is written to a temporary sibling (``.NAME.tmp-PID``) and renamed into
  place when complete, so a failed or killed command leaves ``--out`` as it was.
- An ``--out`` that is, contains or lies inside one of the command's inputs is refused.
- An existing, non-empty ``--out`` is refused unless ``overwrite`` is given, and even then it is
  replaced only if svd-serve wrote it (it holds the :data:`MARKER` file every output gets):
  a directory of anyone else's files is never deleted.
- Temporaries left by a killed run (its process is gone) are removed by the next run on that
  ``--out``, and the removal is reported; an earlier output a killed run had moved aside is put back.
- Written tensors are checked finite first (:func:`check_finite`): NaN is never renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import SvdServeError

MARKER = ".svd-serve"  # an empty file in every directory svd-serve writes as an output


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and all(p.name == MARKER for p in path.iterdir())


def check_out(out: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
              flag: str = "--out") -> Path:
    """Refuse ``out`` if writing it could lose data (see the module doc); returns it as a Path."""
    out = Path(out)
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        src = _resolved(given)
        if target == src or src in target.parents or target in src.parents:
            where = "is" if target == src else ("lies inside" if src in target.parents else "contains")
            raise SvdServeError(f"{flag} {out} {where} the input {given}: choose another {flag}")
    remove_stale_temporaries(out)  # (first: it may put back the output a killed run had moved away)
    if out.exists() and not out.is_dir():
        raise SvdServeError(f"{flag} {out} exists and is not a directory")
    if out.is_dir() and not is_empty_dir(out):
        if not overwrite:
            raise SvdServeError(f"{flag} {out} exists and is not empty: choose another {flag}, or pass "
                                "--overwrite to replace an earlier svd-serve output")
        if not (out / MARKER).is_file():
            raise SvdServeError(f"{flag} {out} holds files svd-serve did not write; --overwrite replaces "
                                "only svd-serve outputs: move them away or choose another " + flag)
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be created or written (nothing is created here)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SvdServeError(f"cannot create output directory {out}: {existing} is not a directory")
    try:  # a real probe: os.access says yes to root everywhere, /proc and read-only mounts included
        tempfile.TemporaryDirectory(dir=existing, prefix=".svd-serve-probe-").cleanup()
    except OSError as e:
        raise SvdServeError(f"output directory {existing} is not writable ({e.strerror or e})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of ``out`` whose process is gone. A run
    killed between its two renames (``out`` → ``.old``, temporary → ``out``) left no ``out``: its
    ``.old`` is the previous output, and it is put back instead."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("old", "tmp"):
        for p in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))):
                continue
            if kind == "old" and not out.exists() and p.is_dir() and (p / MARKER).is_file():
                p.rename(out)
                print(f"note: restored {out} from {p}, left by an interrupted run", file=sys.stderr)
                continue
            for q in [p, *out.parent.glob(f".{p.name}.*")]:  # and the temporaries of that temporary
                shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
                removed.append(q)
    for p in removed:
        print(f"note: removed {p}, left by an interrupted run", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False):
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out`` (checked by
    :func:`check_out` first), on any error it is removed and ``out`` is left as it was."""
    out = check_out(out, inputs, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdServeError(f"cannot create {out.parent}: {e.strerror}") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / MARKER).touch()
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


def nonfinite(tensors: Iterable) -> tuple[str, int] | None:
    """The first ``(name, count of NaN/infinite values)`` among ``(name, tensor)`` pairs, or None when
    every value is finite. One sum per tensor in its own dtype (no copy; reduced-precision sums
    accumulate in float32): NaN and ±inf survive a sum; a finite tensor whose sum overflows is told
    apart by counting."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad
    return None


def check_finite(tensors: Iterable, what: str) -> None:
    """Refuse ``(name, tensor)`` pairs holding NaN or infinity; ``what`` says what they are, e.g.
    ``"refusing to write out/"`` or ``"the adapter out/"``."""
    bad = nonfinite(tensors)
    if bad is not None:
        raise SvdServeError(f"{what}: tensor {bad[0]} holds {bad[1]} NaN or infinite value(s)")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
