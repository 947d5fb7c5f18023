"""Peak memory (RSS) and wall time of ``export``, ``fold``, ``merge`` and ``extract`` on bfloat16
Llama checkpoints of three sizes, sharded, beside mergekit (``mergekit-yaml``, lazy loading) on the
same merges and, optionally, beside the in-memory code path of an earlier git revision.

Each command runs in a process of its own; its peak RSS is that process's ``ru_maxrss``
(``os.wait4``), its wall time includes the interpreter's start. The checkpoints are written tensor by
tensor (random weights, hidden 2048, MLP 5632, vocabulary 32000, untied head; the number of layers
sets the size) into a temporary directory that is deleted size by size. Per size:

- two rank-16 LoRA adapters on every Linear (random A and B, made against the checkpoint's
  fingerprint), ``export --target peft`` of one of them;
- ``fold`` of each adapter (the folded checkpoints are the task models mergekit merges);
- ``merge --fold`` of both adapters with TIES (density 0.5) and task arithmetic, and mergekit's merge
  of the two folded task models with the same method and parameters (its output shards set to the
  base's shard size in parameters, so that neither tool holds more than a shard of output);
- ``extract --rank 16`` of the first task model on layer 0's q_proj and v_proj (a full SVD per module
  takes long on a CPU; every other tensor of both checkpoints is still read and compared);
- with ``--baseline-ref REF``, the same commands with svd-serve as it was at git revision REF (run
  from ``git archive``), for sizes up to ``--baseline-max-gb`` (that code path loads the model).

Run ``python -m bench.memory`` (default sizes 0.45, 1.5 and 4 GB: about 3 × 4 GB of disk at the
largest size and a few minutes per size on 2 cores); ``--sizes 0.45,1.5`` skips the largest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
HIDDEN, MLP, VOCAB, HEADS = 2048, 5632, 32000, 16
GB = 1e9
# extract: one full SVD per target; two modules keep the run short, every other tensor of both
# checkpoints is still read (to report what else changed)
EXTRACT_TARGETS = r"model\.layers\.0\.self_attn\.(q|v)_proj"


def layers_for(size_gb: float) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP) * 2
    return max(1, round((size_gb * GB - 2 * VOCAB * HIDDEN * 2) / per_layer))


def build_checkpoint(out: Path, layers: int, shard_bytes: int, seed: int = 0) -> Path:
    """A random bfloat16 Llama written one tensor at a time (never the whole model in memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from svd_serve.weights import ShardWriter, shard_by_size

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         tie_word_embeddings=False, max_position_embeddings=4096)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    out.mkdir(parents=True)
    config.save_pretrained(out)
    plan = shard_by_size({n: 2 * int(torch.Size(s).numel()) for n, s in shapes.items()}, shard_bytes)
    writer = ShardWriter(out, {f: [(n, "BF16", shapes[n]) for n in names] for f, names in plan.items()}, {})
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    return out


def make_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    """A LoRA adapter on every Linear with random A and B, made against the checkpoint's fingerprint."""
    from svd_serve.adapter import AdapterConfig, AdapterSet, make_options
    from svd_serve.weights import Weights
    from svd_serve.model import resolve_targets

    ckpt = Weights(base)
    targets = resolve_targets(ckpt.skeleton, "all-linear")
    config = AdapterConfig(method="lora", options=dataclasses.asdict(make_options("lora", rank=rank)),
                           targets={n: list(ckpt.get_submodule(n).weight.shape) for n in targets},
                           target_spec="all-linear", architecture=ckpt.architecture,
                           base_fingerprint=ckpt.fingerprint(targets), base_model=str(base))
    adapters = AdapterSet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return adapters.save(out)


# The measured command is started by a bare interpreter: a child's ru_maxrss starts from the RSS
# of the process it was forked from, which here holds torch and has written checkpoints.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
               "wall_s": time.perf_counter() - t0}, f)
"""


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its exit status, peak RSS (GB, this process alone) and wall time (s)."""
    result = log.parent / f"{log.name}.result"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, result, *map(str, cmd)], stdout=f,
                       stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    r = json.loads(result.read_text())
    return {"rc": r["rc"], "peak_rss_gb": r["maxrss_kib"] * 1024 / GB, "wall_s": r["wall_s"]}


def old_code(ref: str, into: Path) -> Path:
    """svd-serve as it was at git revision ``ref``, laid out as an importable package."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "svd_serve", "converters"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    shutil.move(str(src / "converters"), str(src / "svd_serve" / "converters"))
    return src


def svd_serve(args: list, src: Path | None = None) -> list:
    if src is None:
        return [sys.executable, "-m", "svd_serve", *args]
    boot = f"import sys; sys.path.insert(0, {str(src)!r}); from svd_serve.cli import main; main()"
    return [sys.executable, "-c", boot, *args]


def mergekit(method: str, base: Path, tasks: list[Path], out: Path, shard_params: int, density: float) -> list:
    import yaml

    params = {"weight": 1.0} | ({"density": density} if method == "ties" else {})
    config = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(t), "parameters": params} for t in tasks]}
    if method == "ties":
        config["parameters"] = {"normalize": True}
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "mergekit.scripts.run_yaml", path, out, "--lazy-unpickle",
            "--no-copy-tokenizer", "--out-shard-size", str(shard_params), "--quiet"]


def run_size(size_gb: float, args, work: Path, src: Path | None, log: Path) -> list[dict]:
    from svd_serve.weights import Weights

    base = build_checkpoint(work / "base", layers_for(size_gb), args.shard_bytes)
    ckpt = Weights(base)
    shard = max(f.stat().st_size for f in base.glob("*.safetensors"))
    info = {"size_gb": ckpt.nbytes / GB, "layers": layers_for(size_gb),
            "shards": len(list(base.glob("*.safetensors"))), "largest_shard_gb": shard / GB}
    print(f"\n{info['size_gb']:.2f} GB checkpoint, {info['layers']} layers, {info['shards']} shards "
          f"(largest {info['largest_shard_gb']:.2f} GB)", flush=True)
    adapters = [make_adapter(base, work / f"task{i}", args.rank, seed=i + 1) for i in range(2)]
    rows = []

    def row(command: str, tool: str, cmd: list, out: Path | None) -> None:
        r = {**info, "command": command, "tool": tool, **measure(cmd, log)}
        rows.append(r)
        print(f"  {command:28s} {tool:18s} rc {r['rc']}  peak RSS {r['peak_rss_gb']:6.2f} GB  "
              f"wall {r['wall_s']:6.1f} s", flush=True)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)

    row("export peft", "svd-serve", svd_serve(["export", "--target", "peft", "--base", base, "--adapter",
                                               adapters[0], "--out", work / "exp"]), work / "exp")
    tasks = []
    for i, a in enumerate(adapters):
        out = work / f"folded{i}"
        cmd = svd_serve(["fold", "--base", base, "--adapter", a, "--out", out])
        if i == 0:
            row("fold", "svd-serve", cmd, None)
        else:
            measure(cmd, log)
        tasks.append(out)
    for method in args.methods:
        extra = ["--density", args.density] if method == "ties" else []
        row(f"merge {method}", "svd-serve", svd_serve(["merge", "--base", base, "--adapter", adapters[0],
                                                         "--adapter", adapters[1], "--method", method,
                                                         *extra, "--fold", "--out", work / "merged"]),
            work / "merged")
        if args.mergekit:
            row(f"merge {method}", "mergekit-yaml", mergekit(method, base, tasks, work / "mk",
                                                              args.shard_bytes // 2, args.density), work / "mk")
    row("extract", "svd-serve", svd_serve(["extract", "--base", base, "--finetuned", tasks[0],
                                            "--rank", 16, "--targets", EXTRACT_TARGETS, "--out", work / "ext"]),
        work / "ext")
    if src is not None and size_gb <= args.baseline_max_gb:
        tool = f"svd-serve {args.baseline_ref}"
        row("export peft", tool, svd_serve(["export", "--target", "peft", "--base", base, "--adapter",
                                            adapters[0], "--out", work / "exp"], src), work / "exp")
        row("fold", tool, svd_serve(["fold", "--base", base, "--adapter", adapters[0], "--out",
                                     work / "f-old"], src), work / "f-old")
        for method in args.methods:
            extra = ["--density", args.density] if method == "ties" else []
            row(f"merge {method}", tool, svd_serve(["merge", "--base", base, "--adapter", adapters[0],
                                                      "--adapter", adapters[1], "--method", method, *extra,
                                                      "--fold", "--out", work / "m-old"], src), work / "m-old")
        row("extract", tool, svd_serve(["extract", "--base", base, "--finetuned", tasks[0], "--rank", 16,
                                        "--targets", EXTRACT_TARGETS, "--out", work / "e-old"], src), work / "e-old")
    return rows


def table(rows: list[dict]) -> str:
    head = "| checkpoint | shards (largest) | command | tool | peak RSS | wall |\n|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['size_gb']:.2f} GB | {r['shards']} ({r['largest_shard_gb']:.2f} GB) | {r['command']} | {r['tool']} | "
        f"{r['peak_rss_gb']:.2f} GB | {r['wall_s']:.1f} s |" + ("" if r["rc"] == 0 else f" exit {r['rc']}") + "\n"
        for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.45,1.5,4", help="Weights sizes in GB, comma list.")
    ap.add_argument("--shard-size", default="400MB", help="Shard size of the checkpoints.")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", default="ties,task_arithmetic", help="Merge methods, comma list.")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--no-mergekit", dest="mergekit", action="store_false")
    ap.add_argument("--baseline-ref", help="Also run svd-serve as of this git revision (in-memory path).")
    ap.add_argument("--baseline-max-gb", type=float, default=0.5, help="Largest size the baseline runs on.")
    ap.add_argument("--workdir", help="Where the checkpoints go (default: the system's temporary directory).")
    ap.add_argument("--json", help="Also write the rows here.")
    args = ap.parse_args()
    from svd_serve.weights import parse_size

    args.shard_bytes = parse_size(args.shard_size)
    args.methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="svd-serve-memory-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        log = tmp.parent / f"{tmp.name}.log"
        src = old_code(args.baseline_ref, tmp / "old") if args.baseline_ref else None
        print(f"commands' output: {log}")
        for size in [float(s) for s in args.sizes.split(",")]:
            work = tmp / f"{size}gb"
            rows += run_size(size, args, work, src, log)
            shutil.rmtree(work)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
