"""SIGKILL at the dangerous moments of every writing command. An earlier complete output is at
``--out`` and the killed run was replacing it (``--overwrite``). Kill points:

- ``write``: while the new output is being written into its temporary sibling (the parent kills as
  soon as the temporary appears; the run's commit is held back so that the kill lands in between);
- ``aside`` (fold only: every command commits through the same ``atomic_dir``): the new output
  complete, just before the earlier one is moved aside;
- ``commit``: the earlier output moved aside, just before the new one is renamed into place.

After each: ``--out`` is the earlier output or absent (never a mixture), no process the run started
is alive, the next run without ``--overwrite`` puts a moved-aside output back and refuses, and the
next run with ``--overwrite`` removes the dead run's temporaries and writes what an uninterrupted
run writes. Training is killed while it writes a checkpoint and between the two files of its final
adapter; ``--resume`` or ``--overwrite`` then ends with the adapter of an uninterrupted run.

Runs are forked from a server that has imported svd-serve once, so a kill test costs a command's
work, not an interpreter start.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import digest, invoke, make_adapter, max_diff, one_error

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["helpers", "svd_serve.cli", "svd_serve.training", "svd_serve.fold", "svd_serve.merge",
                            "svd_serve.export", "svd_serve.importer", "svd_serve.extract",
                            "transformers.models.llama.modeling_llama"])
POINTS = ("write", "aside", "commit")


def contents(out: Path) -> dict[str, bytes]:
    """Every file of an output with its content, where the output's own absolute path (which serve.json
    and the like record) reads ``OUT``: outputs written at two places compare equal."""
    root = str(out.resolve()).encode()
    return {str(p.relative_to(out)): p.read_bytes().replace(root, b"OUT") for p in sorted(out.rglob("*")) if p.is_file()}


def descendants(pid: int) -> set[int]:
    """The live processes started (directly or not) by ``pid``."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run(argv: list[str], point: str, out: str, hold: str | None) -> None:
    """In the forked child: kill this process at ``point`` (or hold back the first rename that touches
    ``hold``, so that the parent's kill lands while the output is being written), then run the command."""
    import pathlib

    out_path, held = pathlib.Path(out), pathlib.Path(hold) if hold else None
    rename = pathlib.Path.rename

    def dying_rename(self, target):
        target = pathlib.Path(target)
        if (point == "aside" and self == out_path) or (point == "commit" and target == out_path):
            os.kill(os.getpid(), signal.SIGKILL)
        if held is not None and held in (self, target):
            time.sleep(600)  # before the first rename that touches the output: the parent kills us here
        return rename(self, target)

    pathlib.Path.rename = dying_rename
    if point == "final":  # between the weights and the config of train's final adapter
        replace = os.replace

        def dying_replace(src, dst):
            if pathlib.Path(dst) == out_path / "svd_adapter.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return replace(src, dst)

        os.replace = dying_replace
    from svd_serve.cli import main

    main(argv)


def kill_run(argv: list, point: str, out: Path, watch: Path | None = None, hold: Path | None = None) -> set[int]:
    """Run ``argv`` in a forked child and SIGKILL it at ``point`` (``write``: when ``watch`` — a glob
    pattern with ``{pid}`` — appears); returns the processes it had started. Fails if it was not killed."""
    proc = CTX.Process(target=_run, args=([str(a) for a in argv], point, str(out), str(hold) if hold else None))
    proc.start()
    children: set[int] = set()
    if watch is not None:
        pattern = str(watch).format(pid=proc.pid)
        deadline = time.monotonic() + 600
        while not list(Path(pattern).parent.glob(Path(pattern).name)) and proc.is_alive():
            assert time.monotonic() < deadline, f"{pattern} never appeared"
            children = descendants(proc.pid) or children
            time.sleep(0.005)
        children |= descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(600)
    assert proc.exitcode == -signal.SIGKILL, f"the run was not killed (exit code {proc.exitcode})"
    deadline = time.monotonic() + 30
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if alive(p)], "a process of the killed run outlived it"
    return children


@pytest.fixture(scope="module")
def inputs(tiny_model, trained_adapter, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill-inputs")
    base = tiny_model("llama")
    second = make_adapter(base, root / "second", method="pissa", seed=3)
    finetuned = root / "finetuned"
    code, output = invoke("fold", "--base", base, "--adapter", second, "--out", finetuned)
    assert code == 0, output
    peft = root / "peft"
    code, output = invoke("export", "--target", "peft", "--base", base, "--adapter", second, "--out", peft)
    assert code == 0, output
    return {"base": base, "adapter": trained_adapter, "second": second, "finetuned": finetuned, "peft": peft}


COMMANDS = {
    "fold": "fold --base {base} --adapter {adapter}",
    "merge-fold": "merge --base {base} --adapter {adapter} --adapter {second} --method ties --density 0.5 --fold",
    "merge-adapter": "merge --base {base} --adapter {adapter} --adapter {second} --method tsv --max-rank 4",
    "merge-twin": "merge --base {base} --adapter {adapter} --adapter {second} --method twin --max-rank 4",
    "export-peft": "export --target peft --base {base} --adapter {second}",
    "export-vllm": "export --target vllm --base {base} --adapter {adapter} --adapter {second}",
    "export-onnx": "export --target onnx --base {base} --adapter {adapter} --dtype float32",
    "import": "import --from peft --adapter {peft} --base {base}",
    "extract": "extract --base {base} --finetuned {finetuned} --max-rank 8",
}
CASES = [pytest.param(c, p, marks=[pytest.mark.onnx] if c == "export-onnx" else [], id=f"{c}-{p}")
         for c in COMMANDS for p in POINTS if p != "aside" or c == "fold"]  # (aside: the state of write, later)


@pytest.fixture(scope="module")
def complete(inputs, tmp_path_factory):
    """``complete(command)``: the output of an uninterrupted run (a relative --out, as every finished run
    of the test writes), made once per command."""
    made: dict[str, Path] = {}

    def get(command: str) -> Path:
        if command not in made:
            root = tmp_path_factory.mktemp(command)
            cwd = os.getcwd()
            os.chdir(root)
            try:
                code, output = invoke(*[a.format(**inputs) for a in COMMANDS[command].split()], "--out", "out")
            finally:
                os.chdir(cwd)
            assert code == 0, output
            made[command] = root / "out"
        return made[command]

    return get


@pytest.mark.parametrize("command,point", CASES)
def test_kill(command, point, inputs, complete, tmp_path, monkeypatch):
    args = [a.format(**inputs) for a in COMMANDS[command].split()]
    monkeypatch.chdir(tmp_path)  # the runs that finish write a relative --out
    out = tmp_path / "out"
    shutil.copytree(complete(command), out)
    reference = contents(complete(command))
    (out / "earlier.txt").write_text("a file of the earlier output\n")  # (tells the earlier output apart)
    earlier = digest(out)

    watch = tmp_path / ".out.tmp-{pid}" if point == "write" else None
    started = kill_run([*args, "--out", out, "--overwrite"], point, out, watch, hold=out if watch else None)

    leftovers = sorted(p.name for p in tmp_path.glob(".out.*"))
    if point == "commit":  # between the two renames: the earlier output is aside, the new one complete
        assert not out.exists() and any(".out.old-" in n for n in leftovers), leftovers
    else:
        assert digest(out) == earlier
    assert any(".out.tmp-" in n for n in leftovers), leftovers

    code, output = invoke(*args, "--out", "out")  # without --overwrite: refused, the earlier output intact
    one_error(code, output, "exists and is not empty")
    assert digest(out) == earlier
    assert ("restored" in output) == (point == "commit") and "left by an interrupted run" in output
    assert not list(tmp_path.glob(".out.*"))  # the dead run's temporaries are gone

    code, output = invoke(*args, "--out", "out", "--overwrite")
    assert code == 0, output
    assert contents(out) == reference  # what an uninterrupted run writes
    assert not list(tmp_path.glob(".out.*"))
    assert not [p for p in started if alive(p)]


TRAIN = "train --base {base} --data {data} --method kasa --steps 3 --save-every 1 --keep-checkpoints 2 --lr 1e-2 --no-progress"


@pytest.mark.parametrize("point", ["checkpoint", "final"])
def test_kill_train(point, tiny_model, qa_data, tmp_path):
    args = TRAIN.format(base=tiny_model("llama"), data=qa_data).split()
    code, output = invoke(*args, "--out", tmp_path / "ref")
    assert code == 0, output

    out = tmp_path / "run"
    if point == "checkpoint":  # while checkpoint 2 is written
        kill_run([*args, "--out", out], "write", out, watch=out / "checkpoints" / ".step-2.tmp-{pid}",
                 hold=out / "checkpoints" / "step-2")
        assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-1"]
    else:
        kill_run([*args, "--out", out], "final", out)
        assert (out / "svd_adapter.safetensors").is_file()
    assert not (out / "svd_adapter.json").exists()  # no adapter: never a half-written one

    code, output = invoke(*args, "--out", out, "--resume")
    assert code == 0, output
    assert "resumed from" in output
    assert max_diff(tmp_path / "ref", out) == 0  # the adapter of the uninterrupted run
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
