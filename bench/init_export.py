"""Init and export speed of svd-serve against Hugging Face PEFT and against a dense-SVD export.

    python bench/init_export.py                 # llama 1024/2816 x 4 layers; 7B-shaped export layers
    python bench/init_export.py --quick         # smaller model and export layers
    python bench/init_export.py --only init --base "$(python scripts/smollm2.py)"   # a real checkpoint
    python bench/init_export.py --only init --methods pissa,olora --repeats 3
                                                # --repeats N keeps the best of N timings,
                                                # --threads N sets torch's CPU threads

Init: KaSA, PiSSA, OLoRA and CorDA (IPA) on every Linear but the head (``all-linear``) of a locally
built llama or of ``--base``, svd-serve (``AdapterSet.create``) against PEFT (``get_peft_model``; for
CorDA ``preprocess_corda`` from a covariance file, then ``get_peft_model``). Both sides get the same
scale (alpha = 2r) and, for CorDA, the same input covariances (svd-serve's, from calibration rows,
saved for PEFT; the calibration itself is not timed). Each piece an init takes out of the base (KaSA's
r minor components, PiSSA's r principal ones, OLoRA's s·Q[:, :r] R[:r], CorDA's first r triplets of
W C mapped back through C⁻¹) is compared with the same piece from an exact float64 decomposition of
the same weight: the table shows the largest absolute difference over all layers.

Export: ΔW = B @ A of trained-like KaSA and PiSSA adapters (rank 2r) on 7B-shaped layers, written
in its smallest exact rank by ``svd_serve.linalg.compress`` (QR + SVD of a 2r x 2r core) against
the dense route (``torch.linalg.svd`` of the m x n product, rank by the same threshold).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from benchlib import BASE_HELP, base_model, chat_rows, load_line  # noqa: E402

from svd_serve.adapter import AdapterSet, make_options  # noqa: E402
from svd_serve.linalg import compress  # noqa: E402
from svd_serve.methods import get_method  # noqa: E402
from svd_serve.methods.corda import damped_inverse  # noqa: E402
from svd_serve.model import load_base, resolve_targets  # noqa: E402

RTOL = 1e-6  # rank threshold of both export routes (compress's default)
INIT_METHODS = ("kasa", "pissa", "olora", "corda")
GOAL_INIT, GOAL_EXPORT = 3.0, 20.0


def best_time(fn, repeats: int, setup=None):
    """Best wall time of ``fn(setup())`` over ``repeats`` runs (setup not timed) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        out = fn(arg) if setup else fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# --- init ----------------------------------------------------------------------------------------
def reference(kind: str, w: torch.Tensor, r: int, scale: float, cov: torch.Tensor | None) -> torch.Tensor:
    """The piece an init of ``kind`` takes out of ``w``, densely from an exact float64 decomposition."""
    w = w.double()
    if kind == "olora":
        q, rr = torch.linalg.qr(w)
        return scale * q[:, :r] @ rr[:r]
    if kind == "corda":
        fixed, inv = (t.double() for t in damped_inverse(cov, 0.01))
        u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r] @ inv
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    picked = slice(0, r) if kind == "principal" else slice(-r, None)
    return (u[:, picked] * s[picked]) @ vh[picked]


def max_err(pieces, refs: dict[str, torch.Tensor]) -> float:
    """Largest |piece − reference piece| over all layers (``pieces``: ``(name, dense piece)`` pairs)."""
    return max(float((piece.double() - refs[name]).abs().max()) for name, piece in pieces)


def svd_serve_init(method: str, r: int, targets: list[str], covs=None, **options):
    def run(model):
        opts = make_options(method, rank=r, **options)
        return AdapterSet.create(model, method, opts, targets, target_spec="all-linear", statistics=covs,
                                 progress=False)
    return run


def svd_serve_pieces(adapters: AdapterSet, originals=None):
    """What the init took out of the base: KaSA's dropped part, the residual methods' s·B0 A0."""
    for name, layer in adapters.items():
        if adapters.config.method == "kasa":
            yield name, layer.dropped_us.double() @ layer.dropped_vh.double()
        else:
            yield name, layer.scale * layer.B0.double() @ layer.A0.double()


def peft_init(r: int, targets: list[str], corda_covs: Path | None = None, **config):
    def run(model):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        if corda_covs is not None:
            config.update(init_lora_weights="corda",
                          corda_config=CordaConfig(covariance_file=str(corda_covs), corda_method="ipm"))
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if corda_covs is not None:
                preprocess_corda(model, lora)
            return get_peft_model(model, lora)
    return run


def peft_pieces(peft_model, originals: dict[str, torch.Tensor]):
    """PEFT rewrites the base weight in place: what it took out is ``W_original − W_new``."""
    inner = peft_model.base_model.model
    for name, w in originals.items():
        yield name, w.double() - inner.get_submodule(name).get_base_layer().weight.detach().double()


def bench_init(args, tmp: Path) -> dict:
    from peft import KasaConfig
    from transformers import AutoTokenizer

    from svd_serve.calib import input_covariances
    from svd_serve.tiny import CORPUS

    path, what = base_model(args.base, tmp, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.heads)
    base = load_base(path)
    targets = resolve_targets(base, "all-linear")
    originals = {n: base.get_submodule(n).weight.detach().clone() for n in targets}
    shapes = sorted({tuple(w.shape) for w in originals.values()})
    methods = args.methods.split(",")
    print(f"\n== init: {what}; {len(targets)} targets (all-linear, shapes "
          f"{', '.join(f'{m}x{n}' for m, n in shapes)}), r = {args.rank} ==", flush=True)
    covs, cov_file = None, None
    if "corda" in methods:  # one calibration for both sides, not timed
        rows = chat_rows(32) if args.base else [{"text": t} for t in CORPUS]
        covs = input_covariances(base, targets, rows, AutoTokenizer.from_pretrained(path))
        cov_file = tmp / "covariances.pt"
        torch.save({n: c.float() for n, c in covs.items()}, cov_file)

    r, fresh = args.rank, (lambda: copy.deepcopy(base))
    scale = 2.0  # alpha = 2r on both sides
    rows = {  # method: [(label, kind, run, pieces)], svd-serve first, then PEFT
        "kasa": [("kasa   svd-serve (f64 Gram, r minor eigenpairs)", "minor", svd_serve_init("kasa", r, targets), svd_serve_pieces),
                 ("kasa   PEFT KaSA (f32 full SVD)", "minor", peft_init(r, targets, kasa_config=KasaConfig()), None)],
        "pissa": [("pissa  svd-serve (f64 Gram, r top eigenpairs)", "principal", svd_serve_init("pissa", r, targets), svd_serve_pieces),
                  ("pissa  PEFT init_lora_weights='pissa'", "principal", peft_init(r, targets, init_lora_weights="pissa"), None),
                  ("pissa  svd-serve niter=4 (q = 2r)", "principal", svd_serve_init("pissa", r, targets, niter=4), svd_serve_pieces),
                  ("pissa  PEFT 'pissa_niter_4' (q = r)", "principal", peft_init(r, targets, init_lora_weights="pissa_niter_4"), None)],
        "olora": [("olora  svd-serve (f64 QR of W[:, :r])", "olora", svd_serve_init("olora", r, targets), svd_serve_pieces),
                  ("olora  PEFT init_lora_weights='olora'", "olora", peft_init(r, targets, init_lora_weights="olora"), None)],
        "corda": [("corda  svd-serve IPA (f64 Gram of W C)", "corda", svd_serve_init("corda-ipa", r, targets, covs), svd_serve_pieces),
                  ("corda  PEFT CorDA 'ipm' (f32 full SVD)", "corda", peft_init(r, targets, corda_covs=cov_file), None)],
    }
    results = {}
    for method in methods:
        t0 = time.perf_counter()
        kind = rows[method][0][1]
        refs = {n: reference(kind, w, r, scale, covs[n] if covs else None) for n, w in originals.items()}
        print(f"  ({method}: float64 reference decompositions {time.perf_counter() - t0:.1f} s)", flush=True)
        results[method] = []
        for label, kind, run, pieces in rows[method]:
            torch.manual_seed(0)
            seconds, out = best_time(run, args.repeats, setup=fresh)
            results[method].append((label, seconds, max_err((pieces or peft_pieces)(out, originals), refs)))
            del out
            print(f"  {label:<48} {seconds:8.2f} s", flush=True)
        del refs

    print(f"\n{'method implementation':<48} {'time s':>8} {'speedup':>8}  {'max |err| vs f64':>17}")
    for method, res in results.items():
        for ours, peft in zip(res[::2], res[1::2]):  # each svd-serve row, then its PEFT row
            print(f"{ours[0]:<48} {ours[1]:8.2f} {peft[1] / ours[1]:7.2f}x  {ours[2]:17.2e}")
            print(f"{peft[0]:<48} {peft[1]:8.2f} {'(ref)':>8}  {peft[2]:17.2e}")
    print("speedup = PEFT time / svd-serve time on the row below; error: max over all layers of "
          "|piece taken out of W - the same piece from a float64 decomposition|, max |W| = "
          f"{max(float(w.abs().max()) for w in originals.values()):.3f}")
    return results


# --- export --------------------------------------------------------------------------------------
def orthonormal(rows: int, cols: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols))[0]


@torch.no_grad()
def trained_like(method: str, m: int, n: int, r: int):
    """A method adapter whose tensors look trained (moved away from their init): ΔW has rank 2r."""
    layer = get_method(method)(m, n, make_options(method, rank=r))
    if method == "kasa":
        layer.A.normal_(0, n ** -0.5)
        layer.B.normal_(0, 1e-3)
        layer.d.normal_()
        sigma = torch.linspace(0.02, 0.002, r)  # the minor singular values of a 7B weight are O(1e-3..1e-2)
        layer.dropped_us.copy_(orthonormal(m, r) * sigma)
        layer.dropped_vh.copy_(orthonormal(n, r).T)
    else:
        sigma = torch.linspace(1.0, 0.3, r) / layer.scale
        layer.B0.copy_(orthonormal(m, r) * sigma.sqrt())
        layer.A0.copy_(sigma.sqrt()[:, None] * orthonormal(n, r).T)
        layer.B.copy_(layer.B0 + 1e-3 * torch.randn(m, r))
        layer.A.copy_(layer.A0 + 1e-3 * torch.randn(r, n))
    return layer


def dense_export(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The route without svd-serve: SVD of the dense ΔW, rank by threshold, balanced factors."""
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    rank = int((s > RTOL * s[0]).sum())
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root, rank


def rel_error(exact: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """‖ΔW − B A‖_F / ‖ΔW‖_F in float64."""
    return float(torch.linalg.norm(exact - b.double() @ a.double()) / torch.linalg.norm(exact))


def bench_export(args) -> list:
    shapes = [(1024, 1024), (2816, 1024)] if args.quick else [(4096, 4096), (11008, 4096)]
    r = args.rank
    print(f"\n== export: ΔW = B @ A of trained-like adapters, r = {r} (exact rank 2r = {2 * r}), "
          f"rank threshold {RTOL:g} * sigma_1 ==", flush=True)
    rows = []
    for method in ("kasa", "pissa"):
        for m, n in shapes:
            torch.manual_seed(0)
            a, b = trained_like(method, m, n, r).delta()
            exact = b.double() @ a.double()
            t_fast, low = best_time(lambda: compress(a, b), max(args.repeats, 10))
            t_dense, (da, db, drank) = best_time(lambda: dense_export(a, b), args.repeats)
            rows.append((method, f"{m}x{n}", t_fast, t_dense, low.rank, drank,
                         rel_error(exact, low.A, low.B), rel_error(exact, da, db)))
            del exact, da, db
            print(f"  {method} {m}x{n}: compress {t_fast * 1e3:.1f} ms, dense {t_dense:.1f} s", flush=True)

    print(f"\n{'adapter':<7} {'layer out x in':<15} {'compress ms':>11} {'dense s':>8} {'speedup':>9} "
          f"{'rank c/d':>9} {'rel err compress':>17} {'rel err dense':>14}")
    for method, shape, tf, td, rc, rd, ec, ed in rows:
        print(f"{method:<7} {shape:<15} {tf * 1e3:11.1f} {td:8.2f} {td / tf:8.0f}x "
              f"{f'{rc}/{rd}':>9} {ec:17.2e} {ed:14.2e}")
    print("rel err = ||dW - B'A'||_F / ||dW||_F against the exact float64 product of the adapter factors")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument("--quick", action="store_true", help="smaller toy model (512/1408 x 2) and export layers")
    p.add_argument("--only", choices=["init", "export"], help="run one part")
    p.add_argument("--methods", default=",".join(INIT_METHODS), help="init methods to compare")
    p.add_argument("--repeats", type=int, default=1, help="keep the best of N timings (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    args = p.parse_args()
    size = (512, 1408, 2, 4) if args.quick else (1024, 2816, 4, 8)
    for key, value in zip(("hidden", "intermediate", "layers", "heads"), size):
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_line()} at start "
          "(timings on a shared CPU: compare ratios, not absolute times)")
    with tempfile.TemporaryDirectory() as tmp:
        init = bench_init(args, Path(tmp)) if args.only != "export" else None
    export = bench_export(args) if args.only != "init" else None

    print(f"\n== goals ({load_line()} at end) ==")
    for method, res in (init or {}).items():
        (_, t_ours, e_ours), (_, t_peft, e_peft) = res[:2]  # the exact rows
        met = t_peft / t_ours >= GOAL_INIT and e_ours <= e_peft
        print(f"{method} exact init >= {GOAL_INIT:g}x faster than PEFT at matching accuracy: {t_peft / t_ours:.2f}x, "
              f"max err {e_ours:.2e} (svd-serve) vs {e_peft:.2e} (PEFT) -> {'met' if met else 'NOT met'}")
    if export:
        speed = min(td / tf for _, _, tf, td, *_ in export)
        exact = all(rc == 2 * args.rank for _, _, _, _, rc, *_ in export)
        worst = max(ec for *_, ec, _ in export)
        met = speed >= GOAL_EXPORT and exact
        print(f"export >= {GOAL_EXPORT:g}x faster than the dense route and exact: min speedup {speed:.0f}x, "
              f"ranks {'all' if exact else 'NOT all'} {2 * args.rank}, worst rel err {worst:.2e} "
              f"-> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
