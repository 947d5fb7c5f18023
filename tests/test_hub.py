"""Hugging Face Hub ids as --base (and as a PEFT --adapter to import), with --revision, from a Hugging
Face cache laid out as huggingface_hub lays it out (``models--OWNER--NAME/snapshots/<commit>/`` with
symlinked files, ``refs/<ref>`` holding the commit), in a temporary ``HF_HUB_CACHE``: no Hub is
reachable here. SmolLM2-135M-Instruct is trained by id for two steps, exported by commit, verified
by ref, imported back from a PEFT adapter "on the Hub"; every refusal is one ``error:`` line, and an
unreachable Hub fails at once instead of waiting on the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_error, write_jsonl

from svd_serve.errors import SvdServeError
from svd_serve.hub import resolve
from svd_serve.realmodel import smollm2

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "3f1c0a5e9b7d2c4e6a8b0d1f2e3c4b5a69788796"
OTHER = "0" * 40  # a commit the cache does not hold
TAG = "v1.0"  # a second ref to the same commit
LORA_REPO, LORA_COMMIT = "acme/smol-lora", "a" * 40


def cache_repo(cache: Path, repo_id: str, commit: str, files: Path, refs=("main",)) -> Path:
    """``files``' files as the snapshot ``commit`` of ``repo_id`` in the cache at ``cache``, each a
    symlink (the real cache links snapshots to blobs); ``refs`` point at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            (snap / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The cache (``HF_HUB_CACHE`` for the module), SmolLM2's snapshot in it, and a small training file."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hf-cache"
    snap = cache_repo(cache, REPO, COMMIT, smollm2(), refs=("main", TAG))
    rows = [{"prompt": f"What is {a} plus {a}?", "completion": f" {2 * a}."} for a in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {"tmp": tmp, "cache": cache, "snap": snap, "data": write_jsonl(tmp / "train.jsonl", rows)}


@pytest.fixture(scope="module")
def trained(hub, run_cli):
    """A LoRA adapter trained on SmolLM2 named by its Hub id at the tag, two steps."""
    out = hub["tmp"] / "lora"
    code, output = run_cli("train", "--base", REPO, "--revision", TAG, "--data", hub["data"], "--method", "lora",
                           "--rank", "2", "--steps", "2", "--batch-size", "2", "--max-length", "24",
                           "--max-init-loss-increase", "off", "--no-progress", "--out", out)
    assert code == 0, output
    return out


def test_resolve_by_default_branch_commit_and_tag(hub, tmp_path, monkeypatch):
    for revision in (None, COMMIT, TAG):
        source = resolve(REPO, revision)
        assert source.path == hub["snap"] and (source.path / "config.json").is_file()
        assert source.record() == {"name": REPO, "repo_id": REPO, "revision": revision, "commit": COMMIT}
    # a local directory wins over the cache, whatever its name
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    local = resolve(REPO)
    assert local.path == Path(REPO) and not local.is_hub and local.record()["commit"] is None
    # the vLLM plugin finds vLLM's model by its id in the cache (at $SVD_SERVE_BASE_REVISION)
    from svd_serve.converters.vllm_plugin import REVISION_ENV, served_base_dir

    monkeypatch.chdir(hub["tmp"])
    monkeypatch.setenv(REVISION_ENV, COMMIT)
    assert served_base_dir(REPO) == hub["snap"]
    monkeypatch.setenv(REVISION_ENV, OTHER)
    assert served_base_dir(REPO) is None  # not in the cache: not checked here, vLLM's own checks apply


def test_train_export_verify_by_id(hub, trained, run_cli):
    config = json.loads((trained / "svd_adapter.json").read_text())
    assert (config["base_model"], config["base_revision"], config["base_commit"]) == (REPO, TAG, COMMIT)
    out = hub["tmp"] / "peft"
    code, output = run_cli("export", "--target", "peft", "--base", REPO, "--revision", COMMIT, "--adapter", trained,
                           "--out", out)
    assert code == 0, output
    record = json.loads((out / "svd_serve_export.json").read_text())
    assert record["base_source"] == {"name": REPO, "repo_id": REPO, "revision": COMMIT, "commit": COMMIT}
    assert record["base_fingerprint"] == config["base_fingerprint"]
    code, output = run_cli("export", "--target", "vllm", "--base", REPO, "--adapter", trained, "--out",
                           hub["tmp"] / "vllm")
    assert code == 0, output
    serve = json.loads((hub["tmp"] / "vllm" / "serve.json").read_text())
    assert serve["base_source"] == {"name": REPO, "repo_id": REPO, "revision": None, "commit": COMMIT}
    assert Path(serve["base"]) == hub["snap"].resolve()
    code, output = run_cli("verify", "--target", "peft", "--base", REPO, "--revision", "main", "--export", out,
                           "--prompt", "What is 2 plus 2?", "--max-new-tokens", "2")
    assert code == 0 and output.splitlines()[-1] == "all 2 match", output


def test_import_a_peft_adapter_by_id(hub, trained, run_cli):
    """The PEFT export, published as a Hub repo, imports back into the same ΔW."""
    import torch

    from svd_serve.adapter import AdapterSet

    peft_dir = hub["tmp"] / "peft"
    if not (peft_dir / "adapter_config.json").is_file():
        pytest.skip("needs the export of test_train_export_verify_by_id")
    cache_repo(hub["cache"], LORA_REPO, LORA_COMMIT, peft_dir)
    out = hub["tmp"] / "imported"
    code, output = run_cli("import", "--from", "peft", "--adapter", LORA_REPO, "--adapter-revision", LORA_COMMIT,
                           "--base", REPO, "--out", out)
    assert code == 0, output
    assert json.loads((out / "svd_adapter.json").read_text())["base_model"] == REPO
    got, want = AdapterSet.load(out).deltas(), AdapterSet.load(trained).deltas()
    assert got.keys() == want.keys()
    for name, d in want.items():
        ref = d.B @ d.A
        assert torch.linalg.norm(got[name].B @ got[name].A - ref) <= 1e-5 * torch.linalg.norm(ref), name


def test_serve_dry_run_names_the_id(hub, trained, run_cli):
    code, output = run_cli("serve", "--base", REPO, "--adapter-root", trained.parent, "--dry-run")
    assert code == 0, output
    cmd = output.splitlines()[-1].split()
    assert cmd[cmd.index("--model") + 1] == str(hub["snap"].resolve())
    assert cmd[cmd.index("--served-model-name") + 1] == REPO


@pytest.mark.parametrize("args, needles", [
    (["--base", "HuggingFaceTB/not-cached"], ["HuggingFaceTB/not-cached is neither a local directory nor a model "
                                             "in the Hugging Face cache", "HF_HUB_CACHE=", "offline mode is on"]),
    (["--base", REPO, "--revision", OTHER], [f"{REPO} has no revision '{OTHER}' in the Hugging Face cache",
                                             f"main,{TAG} ({COMMIT[:12]})", "offline mode is on"]),
    (["--base", REPO, "--revision", "v9"], ["has no revision 'v9'"]),
    (["--base", "acme/bad--name"], ["acme/bad--name is neither a local directory nor a valid Hugging Face Hub id"]),
    (["--base", "two words"], ["two words is neither a local directory nor a valid Hugging Face Hub id"]),
    (["--base", "/no/such/dir"], ["base model directory not found: /no/such/dir"]),
])
def test_bad_names_and_revisions(args, needles, hub, trained, run_cli, tmp_path):
    for cmd in (["export", "--target", "peft", "--adapter", trained, "--out", tmp_path / "x"],
                ["train", "--data", hub["data"], "--steps", "1", "--out", tmp_path / "t"]):
        code, output = run_cli(*cmd, *args)
        one_error(code, output, *needles)
        assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()


def test_revision_of_a_local_directory_is_refused(hub, trained, run_cli, tmp_path):
    code, output = run_cli("fold", "--base", hub["snap"], "--revision", "main", "--adapter", trained,
                           "--out", tmp_path / "f")
    one_error(code, output, "--revision main is for a Hugging Face Hub id", "is a local path")
    code, output = run_cli("inspect", "--adapter", trained, "--revision", "main")
    one_error(code, output, "--revision goes with --base")


def test_unreachable_hub_fails_at_once(hub, trained, run_cli, monkeypatch):
    """Offline mode off and the Hub's address refusing connections: a cached id still resolves from the
    cache, and an id that is not cached is refused at once with the reason."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at import (conftest sets it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve(REPO, TAG).record() == {"name": REPO, "repo_id": REPO, "revision": TAG, "commit": COMMIT}
    code, output = run_cli("inspect", "--adapter", trained, "--base", "HuggingFaceTB/not-cached")
    one_error(code, output, "HuggingFaceTB/not-cached is neither a local directory nor a model in the Hugging Face "
              "cache", "the Hugging Face Hub is not reachable", "ConnectError")


def test_library_entry_points_take_ids(hub, trained, tmp_path):
    from svd_serve.fold import fold
    from svd_serve.inspection import inspect

    specs = inspect(trained, REPO, revision=TAG, modules=r"layers\.0\.self_attn\.q_proj")
    assert len(specs) == 1
    with pytest.raises(SvdServeError, match="has no revision 'v9'"):
        fold(REPO, trained, tmp_path / "f", revision="v9")
    assert not (tmp_path / "f").exists()
