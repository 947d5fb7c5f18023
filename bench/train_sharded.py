"""Peak memory per process of a two-process training run with the base sharded (``--fsdp``, FSDP2) beside
the same run data parallel (every process holding the whole base), on the same data and settings.

Each run is ``torchrun --nproc-per-node N -m svd_serve train ...`` on the CPU (gloo), one thread per
process; each process's peak RSS is its ``ru_maxrss``, written at exit by a small launcher. Printed per
rank: both peaks, their difference against the base's weights in the compute dtype (W: data parallel
holds W per process, sharded W/N plus the gathered layers), their ratio, the wall time of each run,
and whether both runs trained the same adapter.

    python bench/train_sharded.py --base "$(python scripts/smollm2.py)"     # SmolLM2-135M, LoRA r=8 q,v
    python bench/train_sharded.py                                          # toy llama 512 x 24 layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BASE_HELP, base_model, chat_rows, load_line, write_jsonl  # noqa: E402

LAUNCHER = """
import os, resource, sys
from svd_serve.cli import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["RSS_OUT"] + "." + os.environ.get("RANK", "0"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""
MB = 2**20


def run(tmp: Path, args: list[str], name: str, procs: int, *flags: str) -> tuple[list[int], float]:
    """One torchrun run: (peak RSS per rank in bytes, wall seconds)."""
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    rss = tmp / f"rss-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RSS_OUT": str(rss)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(procs), str(launcher), *args, *flags, "--out", str(tmp / name)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [int(Path(f"{rss}.{r}").read_text()) for r in range(procs)], wall


def weight_bytes(base: Path, dtype: str) -> int:
    """The base's parameters (tied ones once) in the compute dtype."""
    from svd_serve.weights import Weights

    ckpt = Weights(base)
    size = {"float32": 4, "bfloat16": 2}[dtype]
    return sum(info.numel for info in ckpt.tensors.values()) * size


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "svd_adapter.safetensors"), load_file(b / "svd_adapter.safetensors")
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--method", default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=4, help="rows per process")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, what = base_model(a.base, tmp, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                                num_attention_heads=8, num_key_value_heads=8)
        data = write_jsonl(tmp / "rows.jsonl", chat_rows(64))
        args = ["train", "--base", str(base), "--data", str(data), "--method", a.method, "--rank", str(a.rank),
                "--targets", a.targets, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                "--dtype", a.dtype, "--lr", "2e-3", "--no-progress"]
        print(f"{what}; {a.method} r={a.rank} on {a.targets}, {a.steps} steps, {a.procs} processes x batch "
              f"{a.batch_size}, {a.dtype}, CPU (gloo), 1 thread per process; {load_line()}")
        ddp, ddp_wall = run(tmp, args, "ddp", a.procs)
        fsdp, fsdp_wall = run(tmp, args, "fsdp", a.procs, "--fsdp")
        w = weight_bytes(base, a.dtype)
        same = max_diff(tmp / "ddp", tmp / "fsdp")
        print(f"base weights W ({a.dtype}): {w / MB:.0f} MiB; W/{a.procs} = {w / a.procs / MB:.0f} MiB")
        print(f"{'rank':>4s} {'data parallel':>14s} {'--fsdp':>10s} {'fsdp - dp':>10s} {'(fsdp - dp)/W':>14s} "
              f"{'fsdp / dp':>10s}")
        for r, (d, f) in enumerate(zip(ddp, fsdp)):
            print(f"{r:4d} {d / MB:10.0f} MiB {f / MB:6.0f} MiB {(f - d) / MB:6.0f} MiB {(f - d) / w:14.2f} "
                  f"{f / d:10.2f}")
        print(f"wall: data parallel {ddp_wall:.1f} s, --fsdp {fsdp_wall:.1f} s ({fsdp_wall / ddp_wall:.2f}x); "
              f"adapters max |diff| {same:.1e}; {load_line()}")
        print(json.dumps({"weights": w, "ddp_rss": ddp, "fsdp_rss": fsdp, "ddp_wall": ddp_wall,
                          "fsdp_wall": fsdp_wall, "max_diff": same}))


if __name__ == "__main__":
    main()
