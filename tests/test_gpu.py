"""CUDA paths against the CPU results (marker ``gpu``; ``scripts/gpu-check.sh`` runs them).

Training in float32 and bfloat16 on CUDA, its init health check, fold, every export's factors and
files, PEFT parity, and the data-parallel collectives over a one-process NCCL group. Where no CUDA
device is present every test here is skipped, and the session summary says how many did not run
(conftest.py): a skip is never a pass. The CPU reference of each comparison runs in the same test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import MAX_LOGIT_GAP, adapter_tensors, copy_into_peft, free_port, make_adapter

from svd_serve.converters import TARGETS

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@dataclass(frozen=True)
class Tol:
    """What a CUDA result may differ from the CPU one by, for one compute dtype."""

    loss: float  # relative: losses and the init check's numbers
    update: float  # ‖θ_cuda − θ_cpu‖ / ‖B_cpu‖ of a LoRA trained from B = 0 (its movement)
    weight: float  # relative to |W|: a folded weight, float32 math rounded once (one unit in the last place)
    logits: float  # max |Δ logits| of the same model computed twice (helpers.MAX_LOGIT_GAP)


# bfloat16 keeps 8 bits of mantissa (2⁻⁸ ≈ 4e-3 per rounding). Adam moves every entry by about the
# learning rate whatever the size of its gradient, so an entry whose gradient is within bfloat16's
# rounding of zero can move the other way, hence `update`. Measured with these tests' bodies run on the
# CPU, bfloat16 against float32: update 0.095, losses within 5e-4 (relative),
# init-check module changes within 5e-3 (with the init itself computed from bfloat16 weights).
TOLERANCES = {
    dtype: Tol(loss=loss, update=update, weight=torch.finfo(dtype).eps, logits=MAX_LOGIT_GAP[dtype])
    for dtype, loss, update in ((torch.float32, 1e-5, 1e-3), (torch.bfloat16, 5e-3, 0.3))
}
FOLD_MATH = 1e-6  # relative to max |W|: float32 W + B A summed in another order on another device
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EXPORT_TOL = 1e-5  # relative Frobenius distance of two float32 factorisations of the same ΔW
# what each target's export needs besides svd-serve's own dependencies
REQUIRES = {"onnx": ("onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai", "peft")}
METHODS = ("lora", "kasa", "pissa")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_run(base, data, out, **kw) -> Path:
    from svd_serve.training import TrainConfig, train

    settings = dict(base=str(base), data=str(data), out=str(out), steps=3, lr=1e-2, batch_size=4, progress=False)
    return train(TrainConfig(**{**settings, **kw}))


def close(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * max(abs(want), 1e-12)


# --- training and the init check ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_on_cuda_matches_the_float32_cpu_run(dtype, tiny_model, qa_data, tmp_path):
    """LoRA (its init does not depend on the base's dtype: A from the seed, B = 0) trained for 3 steps
    on CUDA in ``dtype`` against the float32 CPU run: the same losses and the same adapter, within the
    dtype's tolerance; the adapter stays float32."""
    tol = TOLERANCES[DTYPES[dtype]]
    cpu = train_run(tiny_model("llama"), qa_data, tmp_path / "cpu", method="lora", device="cpu")
    gpu = train_run(tiny_model("llama"), qa_data, tmp_path / "gpu", method="lora", device=DEVICE, dtype=dtype)
    ref, got = records(cpu)[1:], records(gpu)[1:]  # after the init check
    assert [r["step"] for r in got] == [1, 2, 3]
    for r, g in zip(ref, got):
        assert g["tokens"] == r["tokens"]
        assert close(g["loss"], r["loss"], tol.loss), (g, r)
    a, b = adapter_tensors(cpu), adapter_tensors(gpu)
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in b.values())
    moved = torch.stack([t.norm() for k, t in a.items() if k.endswith(".B")]).norm()
    assert moved > 0  # B starts at 0: the CPU run trained
    distance = torch.stack([(a[k] - b[k]).norm() for k in a]).norm()
    assert distance <= tol.update * moved, f"{float(distance / moved):.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_check_on_cuda_matches_the_cpu(dtype, tiny_model, qa_data, tmp_path):
    """KaSA drops minor components, so its init check measures something: the step-0 record of a run
    on CUDA (base loss, init loss, every module's ‖ΔW x‖ / ‖W x‖) against the CPU run in the same dtype
    (the same bfloat16 weights give the same init), and the base loss against float32 on the CPU."""
    tol = TOLERANCES[DTYPES[dtype]]
    kw = dict(method="kasa", steps=1, max_init_loss_increase="off", dtype=dtype)
    cpu, gpu = (records(train_run(tiny_model("llama"), qa_data, tmp_path / name, device=dev, **kw))[0]["init_check"]
                for name, dev in (("cpu", "cpu"), ("gpu", DEVICE)))
    assert gpu["rows"] == cpu["rows"] and gpu["tokens"] == cpu["tokens"]
    assert max(cpu["modules"].values()) > 1e-2  # the init really changes the model's outputs
    for key in ("base_loss", "init_loss"):
        assert close(gpu[key], cpu[key], tol.loss), (key, gpu[key], cpu[key])
    assert gpu["modules"].keys() == cpu["modules"].keys()
    for name, change in cpu["modules"].items():
        assert close(gpu["modules"][name], change, max(tol.loss, 1e-4)), name
    if dtype != "float32":
        fp32 = records(train_run(tiny_model("llama"), qa_data, tmp_path / "fp32", device="cpu",
                                 **{**kw, "dtype": "float32"}))[0]["init_check"]
        assert close(gpu["base_loss"], fp32["base_loss"], tol.loss)


# --- fold ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_on_cuda_matches_svd_serve_fold(dtype, tmp_path):
    """``AdapterSet.fold_into`` on a CUDA model in ``dtype`` against ``svd-serve fold`` (CPU, from the
    files) of the same base stored in that dtype: every weight within one rounding of the dtype."""
    from svd_serve.adapter import AdapterSet
    from svd_serve.fold import fold
    from svd_serve.model import load_base
    from svd_serve.tiny import build_tiny_model

    tol = TOLERANCES[DTYPES[dtype]]
    base = build_tiny_model(tmp_path / "base", "llama", dtype=DTYPES[dtype])
    adapter = make_adapter(base, tmp_path / "kasa", "kasa", targets="all-linear", scale=0.2)
    reference = load_base(fold(base, adapter, tmp_path / "folded"), "auto").state_dict()
    model = load_base(base, "auto").to(DEVICE)
    adapters = AdapterSet.load(adapter, model).to(DEVICE)
    adapters.fold_into(model)
    changed = 0
    for key, want in reference.items():
        got = model.state_dict()[key]
        assert got.device.type == DEVICE and got.dtype == want.dtype == DTYPES[dtype], key
        got, want = got.cpu().float(), want.float()
        bound = tol.weight * torch.maximum(got.abs(), want.abs()) + FOLD_MATH * want.abs().max()
        assert ((got - want).abs() <= bound).all(), key
        changed += key.removesuffix(".weight") in adapters.config.targets
    assert changed == len(adapters.config.targets)
    original = load_base(base, "auto").state_dict()
    name = next(iter(adapters.config.targets))
    assert not torch.equal(reference[f"{name}.weight"], original[f"{name}.weight"])  # the fold did something


# --- exports ---------------------------------------------------------------------------------------------
def written_factors(target: str, out: Path, name: str) -> dict:
    """What a target wrote for adapter ``name`` under ``out``, read back as ``ΔW = B A`` per module."""
    if target == "peft":
        from svd_serve.converters.peft import read_lora

        return read_lora(out)
    if target == "vllm":
        from svd_serve.converters.peft import read_lora

        return read_lora(out / name)
    if target == "onnx":
        from svd_serve.converters.onnx import SUFFIX, adapter_factors

        return adapter_factors(out / "adapters" / (name + SUFFIX))
    raise AssertionError(f"no reader for target {target}: add one here")


def same_delta(got, want, tol: float) -> float:
    """The relative Frobenius distance of two factorisations ``(A, B)`` of ΔW (float64, factor space)."""
    from svd_serve.export import factor_errors
    from svd_serve.linalg import LowRank

    err = factor_errors(LowRank(*(t.cpu().float() for t in want)), LowRank(*(t.cpu().float() for t in got)))[0]
    assert err <= tol, f"{err:.3e}"
    return err


@pytest.fixture(scope="module")
def exported_adapters(tiny_model, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gpu-adapters")
    return [make_adapter(tiny_model("llama"), root / m, m, targets="all-linear", seed=i, scale=0.1)
            for i, m in enumerate(METHODS)]


@pytest.mark.parametrize("target", list(TARGETS))
def test_export_computed_on_cuda(target, tiny_model, exported_adapters, tmp_path):
    """Each adapter's exact ΔW factors (smallest exact rank, and truncated to rank 2) computed from its
    layers on CUDA against the CPU computation ``svd-serve export`` makes; the export's own check
    passes on them, and the files the target writes from them hold the ΔW of the CPU export's files."""
    import importlib.util

    from svd_serve.adapter import AdapterSet
    from svd_serve.converters import ExportedAdapter, ExportJob, get_target
    from svd_serve.export import check_factors, export
    from svd_serve.model import linear_names
    from svd_serve.weights import Weights

    missing = [m for m in REQUIRES.get(target, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"--target {target} needs {', '.join(missing)}, which is not installed")
    base = tiny_model("llama")
    ckpt = Weights(base)
    options = {"dtype": "float32"} if target == "onnx" else {}  # the graph ONNX Runtime's CPU provider runs
    groups = [[p] for p in exported_adapters] if target == "peft" else [exported_adapters]  # peft: one per dir
    for k, group in enumerate(groups):
        cpu_out, gpu_out = tmp_path / f"cpu-{k}", tmp_path / f"gpu-{k}"
        export(target, base, group, cpu_out, **options)
        exported = []
        for path in group:
            cpu_set = AdapterSet.load(path, ckpt)
            gpu_set = AdapterSet.load(path, ckpt).to(DEVICE)
            for max_rank in (2, None):
                want = ExportedAdapter.from_adapter(path.name, path, cpu_set, max_rank)
                got = ExportedAdapter.from_adapter(path.name, path, gpu_set, max_rank)
                assert all(t.device.type == DEVICE for t in [*got.A.values(), *got.B.values()])  # computed there
                for name in want.A:
                    assert got.A[name].shape == want.A[name].shape, name  # the same rank
                    assert abs(got.rel_error[name] - want.rel_error[name]) <= EXPORT_TOL, name
                    same_delta((got.A[name], got.B[name]), (want.A[name], want.B[name]), EXPORT_TOL)
            # the exact factors (the last ones), on the CPU as export() hands them to a target
            got.A = {n: t.cpu() for n, t in got.A.items()}
            got.B = {n: t.cpu() for n, t in got.B.items()}
            check_factors(got, cpu_set)
            exported.append(got)
        job = ExportJob(base=Path(base), adapters=exported, linear_modules=linear_names(ckpt.skeleton),
                        architecture=ckpt.architecture, model_type=ckpt.config.model_type, options=options)
        get_target(target).export(job, gpu_out)
        for path in group:
            want = written_factors(target, cpu_out, path.name)
            got = written_factors(target, gpu_out, path.name)
            assert got.keys() == want.keys() and len(got) > 0
            for name in want:
                same_delta(got[name], want[name], EXPORT_TOL)


# --- PEFT ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_on_device(adapters, seed: int = 0, scale: float = 0.05) -> None:
    """helpers.perturb for parameters on any device (the same values as on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters.parameters():
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device))


@pytest.mark.parametrize("method", ["lora", "pissa", "olora", "kasa"])
def test_peft_parity_on_cuda(method, tiny_model):
    """PEFT's init and svd-serve's, both computed on CUDA from the same base: the same model at init,
    and the same forward once both hold the same perturbed trainable values (test_peft_parity.py on
    the CPU compares the factors one by one)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import KasaConfig

    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.model import load_base, resolve_targets

    tol = TOLERANCES[torch.float32]
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    path = tiny_model("llama")
    kwargs = {"init_lora_weights": {"pissa": "pissa", "olora": "olora"}.get(method, True)}
    if method == "kasa":
        kwargs["kasa_config"] = KasaConfig()
    config = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=linears, **kwargs)
    theirs = get_peft_model(load_base(path).to(DEVICE), config).eval()
    model = load_base(path).to(DEVICE)
    ours = AdapterSet.create(model, method, make_options(method, rank=4, alpha=8.0),
                             resolve_targets(model, "all-linear"), "all-linear", progress=False).to(DEVICE)
    ours.attach(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= tol.logits
        before = model(input_ids=ids).logits.clone()
    perturb_on_device(ours)
    copy_into_peft(theirs, ours, method)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert (adapted - before).abs().max() > 1e-2
        assert (adapted - theirs(input_ids=ids).logits).abs().max() <= tol.logits


def test_peft_loads_the_export_on_cuda(tiny_model, exported_adapters, tmp_path):
    """The PEFT export of a KaSA adapter (rank up to 2r) loaded by ``PeftModel`` on CUDA against the
    float32 CPU base with the adapter folded in."""
    from peft import PeftModel

    from helpers import folded
    from svd_serve.export import export
    from svd_serve.model import load_base

    base, adapter = tiny_model("llama"), exported_adapters[METHODS.index("kasa")]
    export("peft", base, [adapter], tmp_path / "peft")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = folded(base, adapter)(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(load_base(base).to(DEVICE), str(tmp_path / "peft")).eval()
        got = peft_model(input_ids=ids.to(DEVICE)).logits.cpu()
        assert (got - load_base(base)(input_ids=ids).logits).abs().max() > 1e-2  # the adapter acts
    assert (got - want).abs().max() <= TOLERANCES[torch.float32].logits


# --- data-parallel collectives over NCCL ------------------------------------------------------------------------


def test_one_process_nccl_group(tiny_model, qa_data, monkeypatch):
    """``Processes`` in a one-process NCCL group on cuda:0, with the collectives of a data-parallel
    step (they run only when world > 1, so ``world`` is set past the group's one rank, over which each
    collective is the identity): the gradients summed in one all-reduce come back unchanged (a
    missing one as zeros) with the loss sums, and broadcast and the end-of-run check keep the adapter."""
    import dataclasses

    import torch.distributed as dist

    import svd_serve.training.distributed as sd
    from svd_serve.adapter import AdapterSet, make_options
    from svd_serve.dataset import collate, encode, read_jsonl
    from svd_serve.training.distributed import Processes
    from svd_serve.model import load_base, load_tokenizer, resolve_targets
    from svd_serve.training import loss_sum

    backend = "nccl" if DEVICE == "cuda" else "gloo"
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    procs = Processes.start(DEVICE)  # one process: no group, cuda:LOCAL_RANK
    assert procs.world == 1 and procs.master and procs.device == torch.device(DEVICE, 0)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        assert dist.get_backend() == backend
        again = Processes.start(DEVICE)  # an initialised group is joined, not initialised again
        dp = dataclasses.replace(again, world=dist.get_world_size() + 1)
        calls, real = [], dist.all_reduce

        def all_reduce(t, *args, **kwargs):
            calls.append(t.device)
            return real(t, *args, **kwargs)

        monkeypatch.setattr(sd.dist, "all_reduce", all_reduce)

        path = tiny_model("llama")
        model = load_base(path)
        adapters = AdapterSet.create(model, "lora", make_options("lora", rank=4),
                                     resolve_targets(model, "q_proj,v_proj"), progress=False)
        perturb_on_device(adapters)
        model.requires_grad_(False)
        adapters.attach(model)  # (as train.setup: the adapter's parameters are the trainable ones)
        model.to(dp.device)
        tok = load_tokenizer(path)
        batch = collate([encode(r, tok, 64) for r in read_jsonl(qa_data)[:4]], tok.pad_token_id)
        total, count = loss_sum(model, batch, dp.device)
        total.backward()
        params = [p for p in adapters.parameters()]
        params[0].grad = None  # a parameter the step did not reach
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        values = torch.stack([total.detach(), count.double()]).double()
        summed = dp.sum_grads_(params, values)
        assert calls and all(d.type == dp.device.type for d in calls)  # one all-reduce, on the device
        assert summed.dtype == values.dtype and torch.equal(summed, values.float().double())
        assert torch.equal(params[0].grad, torch.zeros_like(params[0]))
        assert all(torch.equal(p.grad, g) for p, g in zip(params[1:], grads[1:]))

        state = {k: v.clone() for k, v in adapters.state_dict().items()}
        dp.broadcast_(adapters.state_dict().values())
        assert all(torch.equal(v, state[k]) for k, v in adapters.state_dict().items())
        stats = torch.tensor([3.0, 4.0], dtype=torch.float64, device=dp.device)
        assert torch.equal(dp.sum_(stats), torch.tensor([3.0, 4.0], dtype=torch.float64, device=dp.device))
        dp.check_same(adapters.state_dict())
        dp.barrier()
    finally:
        dist.destroy_process_group()
