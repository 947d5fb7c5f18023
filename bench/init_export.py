"""Init and export speed of svd-serve against Hugging Face PEFT and against a dense-SVD export.

    python bench/init_export.py                 # llama 1024/2816 x 4 layers; 7B-shaped export layers
    python bench/init_export.py --quick         # smaller model and export layers
    python bench/init_export.py --only init     # one part; --repeats N keeps the best of N timings,
                                                # --threads N sets torch's CPU threads

Init: KaSA and PiSSA on every Linear of a locally built llama (``all-linear``), svd-serve
(``AdapterSet.create``) against PEFT (``get_peft_model``). Each piece an init takes out of the base
(KaSA's r minor components, PiSSA's r principal ones) is compared with an exact float64 SVD of
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from svd_serve.adapter import AdapterSet, make_options  # noqa: E402
from svd_serve.linalg import compress  # noqa: E402
from svd_serve.methods import get_method  # noqa: E402
from svd_serve.model import load_base, resolve_targets  # noqa: E402
from svd_serve.tiny import build_tiny_model  # noqa: E402

RTOL = 1e-6  # rank threshold of both export routes (compress's default)


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
def reference(weights: dict[str, torch.Tensor], r: int) -> dict[str, dict[str, tuple]]:
    """Per weight, its r principal and r minor SVD components as float64 factors (exact SVD)."""
    out = {}
    for name, w in weights.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        out[name] = {"principal": (u[:, :r] * s[:r], vh[:r]), "minor": (u[:, -r:] * s[-r:], vh[-r:])}
    return out


def max_err(pieces: dict[str, torch.Tensor], ref: dict, kind: str) -> float:
    """Largest |piece − reference piece| over all layers (both dense, float64)."""
    err = 0.0
    for name, piece in pieces.items():
        us, vh = ref[name][kind]
        err = max(err, float((piece.double() - us @ vh).abs().max()))
    return err


def svd_serve_init(method: str, r: int, targets: list[str], **options):
    def run(model):
        opts = make_options(method, rank=r, **options)
        return AdapterSet.create(model, method, opts, targets, target_spec="all-linear", progress=False)
    return run


def svd_serve_pieces(adapters: AdapterSet) -> dict[str, torch.Tensor]:
    """What the init took out of the base: KaSA's dropped part, PiSSA's s·B0 A0."""
    out = {}
    for name, layer in adapters.items():
        if adapters.config.method == "kasa":
            out[name] = layer.dropped_us.double() @ layer.dropped_vh.double()
        else:
            out[name] = layer.scale * layer.B0.double() @ layer.A0.double()
    return out


def peft_init(r: int, **config):
    def run(model):
        from peft import LoraConfig, get_peft_model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, LoraConfig(r=r, target_modules="all-linear", **config))
    return run


def peft_pieces(peft_model, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT rewrites the base weight in place: what it took out is ``W_original − W_new``."""
    inner = peft_model.base_model.model
    return {name: w.double() - inner.get_submodule(name).get_base_layer().weight.detach().double()
            for name, w in originals.items()}


def bench_init(args) -> dict:
    from peft import KasaConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp + "/model", "llama", hidden_size=args.hidden,
                                intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, num_key_value_heads=args.heads)
        base = load_base(path)
    targets = resolve_targets(base, "all-linear")
    originals = {n: base.get_submodule(n).weight.detach().clone() for n in targets}
    shapes = sorted({tuple(w.shape) for w in originals.values()})
    print(f"\n== init: llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; "
          f"{len(targets)} targets (all-linear, shapes {', '.join(f'{m}x{n}' for m, n in shapes)}), "
          f"r = {args.rank} ==", flush=True)
    t0 = time.perf_counter()
    ref = reference(originals, args.rank)
    print(f"(float64 reference SVDs: {time.perf_counter() - t0:.1f} s)", flush=True)

    r, fresh = args.rank, (lambda: copy.deepcopy(base))
    rows = [  # label, kind, run, pieces
        ("kasa   svd-serve (minor_svd: f64 eigh of Gram)", "minor", svd_serve_init("kasa", r, targets), svd_serve_pieces),
        ("kasa   PEFT KaSA (f32 full SVD)", "minor", peft_init(r, kasa_config=KasaConfig()), None),
        ("pissa  svd-serve niter=None (f32 full SVD)", "principal", svd_serve_init("pissa", r, targets), svd_serve_pieces),
        ("pissa  PEFT init_lora_weights='pissa'", "principal", peft_init(r, init_lora_weights="pissa"), None),
        ("pissa  svd-serve niter=4 (q = 2r)", "principal", svd_serve_init("pissa", r, targets, niter=4), svd_serve_pieces),
        ("pissa  PEFT 'pissa_niter_4' (q = r)", "principal", peft_init(r, init_lora_weights="pissa_niter_4"), None),
    ]
    results = []
    for label, kind, run, pieces in rows:
        torch.manual_seed(0)
        seconds, out = best_time(run, args.repeats, setup=fresh)
        got = pieces(out) if pieces else peft_pieces(out, originals)
        results.append((label, seconds, max_err(got, ref, kind)))
        del out, got
        print(f"  {label:<48} {seconds:8.2f} s", flush=True)

    print(f"\n{'method implementation':<48} {'time s':>8} {'speedup':>8}  {'max |err| vs f64 SVD':>20}")
    for ours, peft in zip(results[::2], results[1::2]):  # each svd-serve row, then its PEFT row
        print(f"{ours[0]:<48} {ours[1]:8.2f} {peft[1] / ours[1]:7.2f}x  {ours[2]:20.2e}")
        print(f"{peft[0]:<48} {peft[1]:8.2f} {'(ref)':>8}  {peft[2]:20.2e}")
    print("speedup = PEFT time / svd-serve time on the row below; error: max over all layers of "
          "|piece taken out of W - the same piece from a float64 SVD|, max |W| = "
          f"{max(float(w.abs().max()) for w in originals.values()):.3f}")
    return {"kasa": results[:2], "pissa": results[2:]}


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
    p.add_argument("--quick", action="store_true", help="smaller model (512/1408 x 2) and export layers")
    p.add_argument("--only", choices=["init", "export"], help="run one part")
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
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at start "
          "(timings on a shared CPU: compare ratios, not absolute times)")
    init = bench_init(args) if args.only != "export" else None
    export = bench_export(args) if args.only != "init" else None

    print(f"\n== goals (load average {os.getloadavg()[0]:.1f} at end) ==")
    if init:
        (_, t_ours, e_ours), (_, t_peft, e_peft) = init["kasa"]
        met = t_peft / t_ours >= 3 and e_ours <= e_peft
        print(f"KaSA init >= 3x faster than PEFT at matching accuracy: {t_peft / t_ours:.2f}x, "
              f"max err {e_ours:.2e} (svd-serve) vs {e_peft:.2e} (PEFT) -> {'met' if met else 'NOT met'}")
    if export:
        speed = min(td / tf for _, _, tf, td, *_ in export)
        exact = all(rc == 2 * args.rank for _, _, _, _, rc, *_ in export)
        worst = max(ec for *_, ec, _ in export)
        met = speed >= 20 and exact
        print(f"export >= 20x faster than the dense route and exact: min speedup {speed:.0f}x, "
              f"ranks {'all' if exact else 'NOT all'} {2 * args.rank}, worst rel err {worst:.2e} "
              f"-> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
