"""Helpers shared by the test modules (imported as ``helpers``; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from svd_serve.adapter import AdapterSet, make_options, sweep_options
from svd_serve.methods import METHODS
from svd_serve.model import load_base, resolve_targets

# max |Δ logits| accepted when comparing two computations of the same model, by dtype (as vLLM's LoRA tests)
MAX_LOGIT_GAP = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def digest(path: str | Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself), by its path relative to ``path``, with its content
    hash: equal digests, equal files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def scratch_env(tmp: Path) -> dict:
    """Environment of a vLLM subprocess: its caches, scratch files and sockets under ``tmp``."""
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
            "HF_HOME": str(tmp / "hf"), "TMPDIR": str(scratch), "VLLM_RPC_BASE_PATH": str(scratch),
            # logprob ops are torch.compile'd on first use: eager is exact and saves ~30 s
            "TORCH_COMPILE_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_error(code: int, output: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, no traceback; returns that line."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def invoke(*args) -> tuple[int, str]:
    """Run ``svd-serve ARGS`` in-process; returns (exit code, stdout+stderr)."""
    from svd_serve.cli import main

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, buf.getvalue()


# --- adapters -------------------------------------------------------------------------------------
def adapter_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "svd_adapter.safetensors")


def max_diff(a, b) -> float:
    """Largest |difference| between the tensors of two saved adapters (which have the same tensors)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def train_two_processes(args: list, out: Path) -> None:
    """``svd-serve`` with ``args`` (a ``train`` command without ``--out``/``--batch-size``) under torchrun:
    2 CPU processes of batch 2, written to ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "svd_serve", *map(str, args), "--batch-size", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@torch.no_grad()
def perturb(adapters: AdapterSet, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor off its init (as training would), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def make_adapter(base, out, method: str = "lora", rank: int = 4, targets: str = "q_proj,v_proj",
                 seed: int = 0, scale: float = 0.05) -> Path:
    """An adapter as if trained (:func:`perturb`), saved at ``out`` (returned). Methods that need
    calibration get their statistic over a few fixed sentences."""
    from transformers import AutoTokenizer

    from svd_serve.calib import calibrate

    model = load_base(base)
    names = resolve_targets(model, targets)
    opts = sweep_options(method, rank=rank)
    rows = [{"text": f"calibration sentence number {i} about adapters"} for i in range(8)]

    def calibration(statistic: str):
        return calibrate(statistic, model, names, rows, AutoTokenizer.from_pretrained(base))

    adapters = AdapterSet.fresh(model, method, opts, names, targets,
                                calibration if METHODS[method].needs_calibration_for(opts) else None, progress=False)
    perturb(adapters, seed, scale)
    return adapters.save(out)


def folded(base, adapter=None) -> torch.nn.Module:
    """The base with ``adapter`` folded into its weights (the reference every export must match)."""
    model = load_base(base)
    if adapter is not None:
        AdapterSet.load(adapter, model).fold_into(model)
    return model


# --- a base with every method attached (test_methods, test_peft_parity) -------------------------
@dataclass
class Env:
    path: Path
    model: torch.nn.Module
    targets: list[str]
    covs: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    ids: torch.Tensor
    base_logits: torch.Tensor


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).detach().abs().max())


def create(e: Env, method: str, rank: int = 4, **options) -> tuple[torch.nn.Module, AdapterSet]:
    """A fresh copy of the base with ``method`` attached over all-linear targets (``rank`` where the
    method has one)."""
    model = copy.deepcopy(e.model)
    opts = make_options(method, **{**vars(sweep_options(method, rank=rank)), **options})
    statistics = {"covariance": e.covs, "fisher": e.fisher}
    adapters = AdapterSet.fresh(model, method, opts, e.targets, "all-linear",
                                statistics.get if METHODS[method].needs_calibration_for(opts) else None,
                                base_model=str(e.path), progress=False)
    return adapters.attach(model), adapters


def free_port() -> int:
    """A free TCP port on the loopback address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, log: Path, timeout: float = 300) -> None:
    """Wait until the server process ``proc`` answers ``url``/health (its log's end if it dies first)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "server did not start"
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            time.sleep(1)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@torch.no_grad()
def copy_into_peft(peft_model, adapters: AdapterSet, method: str) -> None:
    """Give the PEFT model's LoRA layers the factors (and KaSA's diagonal) of ``adapters``."""
    for name, layer in adapters.items():
        lora = peft_model.base_model.model.get_submodule(name)
        lora.lora_A["default"].weight.copy_(layer.A)
        lora.lora_B["default"].weight.copy_(layer.B)
        if method == "kasa":
            lora.lora_diag["default"].copy_(layer.d)
