"""The base sharded over 2 CPU processes (``--fsdp``: FSDP2 on gloo, launched by torchrun): the same adapter
as one process, an exact resume, each process holding half the base's weights, and no --fsdp without
torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from helpers import max_diff, one_error

# a launcher that runs `svd-serve ARGS` and writes the process's peak RSS (bytes) to $RSS_OUT.<rank>
LAUNCHER = """
import os, resource, sys
from svd_serve.cli import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["RSS_OUT"] + "." + os.environ.get("RANK", "0"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def torchrun(tmp_path, args: list, out, *flags) -> tuple[str, list[int]]:
    """``svd-serve ARGS`` in 2 CPU processes of batch 2 writing to ``out``: (output, peak RSS per rank)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    rss = tmp_path / f"rss-{os.path.basename(out)}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RSS_OUT": str(rss)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher),
         *map(str, args), *flags, "--batch-size", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, [int((tmp_path / f"{rss.name}.{r}").read_text()) for r in range(2)]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def test_sharded_equals_one_process_and_resumes(tiny_model, text_data, tmp_path, run_cli):
    # kasa: an SVD init (each W read whole from the checkpoint), calibrated on the training rows (a
    # sharded forward) and its frozen terms absorbed into the sharded weights
    args = ["train", "--base", tiny_model("llama"), "--data", text_data, "--method", "kasa", "--steps", 4,
            "--lr", 1e-2, "--save-every", 2, "--eval-split", 0.2, "--no-progress"]
    code, output = run_cli(*args, "--batch-size", 4, "--out", tmp_path / "one")
    assert code == 0, output

    torchrun(tmp_path, args, tmp_path / "two", "--fsdp")
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-4  # (as data parallel, test_train_ddp)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]  # only rank 0 writes
    assert abs(one[0]["init_check"]["increase"] - two[0]["init_check"]["increase"]) <= 1e-5
    for a, b in zip(one[1:], two[1:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["tokens"] == b["tokens"]
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in a:
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4

    # resume from the step-2 checkpoint (the final adapter removed: it must be written anew)
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for name in ("svd_adapter.json", "svd_adapter.safetensors"):
        (tmp_path / "resumed" / name).unlink()
    output, _ = torchrun(tmp_path, args, tmp_path / "resumed", "--fsdp", "--resume")
    assert "resumed from" in output and "step-2" in output
    assert max_diff(tmp_path / "two", tmp_path / "resumed") == 0  # the same arithmetic, from the checkpoint
    assert [r["step"] for r in records(tmp_path / "resumed")] == [0, 1, 2, 3, 4]


def test_each_process_holds_half_the_base(tmp_path_factory, text_data, tmp_path):
    """Peak RSS per process, sharded minus data parallel, on a llama of ~330 MB of float32 weights W in
    24 layers: about -W/2 (each rank keeps half of every tensor, a data-parallel rank all of it). What
    FSDP adds besides is a few layers gathered at once (FSDP2 gathers the next one ahead; a layer is
    W/24) and one tensor read whole at a time; the runs are otherwise the same code. The tolerance,
    W/4, leaves room for those and for the allocator's spread (up to 50 MB between the two ranks of
    one run, measured), and is far from a base loaded whole and then sharded (a difference near 0)
    or gathered buffers the allocator keeps (towards +W/2). Every weight matrix is at least 1 MiB,
    as in real models: smaller buffers are served from malloc's heap, which keeps them (sharding.py)."""
    from svd_serve.tiny import build_tiny_model

    wide = build_tiny_model(tmp_path_factory.mktemp("wide") / "model", "llama", hidden_size=512,
                            intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
                            num_key_value_heads=8)
    weights = (wide / "model.safetensors").stat().st_size
    assert weights > 300e6
    args = ["train", "--base", wide, "--data", text_data, "--method", "lora", "--steps", 2, "--lr", 1e-2,
            "--eval-split", 0.2, "--no-progress"]
    _, sharded = torchrun(tmp_path, args, tmp_path / "fsdp", "--fsdp")
    _, replicated = torchrun(tmp_path, args, tmp_path / "ddp")
    # every rank computes what a data-parallel rank computes, with the gathered weights: bit for bit
    assert max_diff(tmp_path / "fsdp", tmp_path / "ddp") == 0
    for s, r in zip(sharded, replicated):
        assert abs((s - r) + weights / 2) <= weights / 4, (sharded, replicated, weights)


def test_fsdp_needs_torchrun(tiny_model, text_data, tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, output = run_cli("train", "--base", tiny_model("llama"), "--data", text_data, "--out", tmp_path / "o",
                           "--steps", 1, "--fsdp")
    one_error(code, output, "--fsdp", "torchrun")
    assert not (tmp_path / "o").exists()

