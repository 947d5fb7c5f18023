"""Adapters on a quantized served base: the plain export (the exact ΔW, written against the original
W) against the export aware of the served base (``export --served-base``, :mod:`svd_serve.served`).

On SmolLM2 (or ``--base``), LoRA, PiSSA and KaSA (``-o select=activation``) adapters of rank r are
trained for ``--steps`` steps on short chat rows (``bench/benchlib.py``); the base is quantized by
``svd_serve.quant.quantize_checkpoint`` as W4A16 (int4, groups of 128 where the in-features allow,
else the largest power of two that divides them) and W8A8 (int8 per channel). The aware factors are
computed at K = exact rank of each module's ΔW (+ 0, r, 2r) on calibration rows, and every variant is
evaluated on held-out rows the calibration never saw, against the full-precision adapted model:

- mean KL(adapted ‖ variant) of the next-token distributions over every position of the rows;
- top-1 agreement: the share of positions where the variant's most likely next token is the
  adapted model's (teacher-forced on the same rows);

for the plain export, the aware ones, and the base alone (the quantized base against the
full-precision base, no adapter). The served model is evaluated in PyTorch as the dequantized base
(float32) plus the LoRA factors, a faithful model of what vLLM computes with weight-only
quantization (vLLM's W8A8 also quantizes activations per token, which this does not model).

    flock /tmp/svd-heavy.lock python -m bench.served_base --out bench/results/served_base.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HELDOUT = Path(__file__).resolve().parent.parent / "tests" / "data"


@torch.no_grad()
def next_token_logprobs(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(input_ids=ids).logits[0].double(), -1) for ids in batches]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """``(mean KL(ref ‖ got), top-1 agreement)`` over every position of every row."""
    kl, same, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        kl += float((r.exp() * (r - g)).sum())
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return kl / n, same / n


def rows_ids(rows: list[dict], tokenizer) -> list[torch.Tensor]:
    from svd_serve.dataset import encode

    return [torch.tensor([encode(r, tokenizer, 256).input_ids]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from benchlib import BASE_HELP

    ap.add_argument("--base", default=None, help=BASE_HELP + " (default here: SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default="lora,pissa,kasa")
    ap.add_argument("--schemes", default="W4A16,W8A8")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--calib-rows", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/svd-bench-served"))
    ap.add_argument("--out", type=Path, default=None, help="markdown table to write")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from benchlib import chat_rows, describe, load_line, trained_adapter, write_jsonl

    from svd_serve.adapter import AdapterSet
    from svd_serve.dataset import read_jsonl
    from svd_serve.model import LowRankDelta, attach, detach, load_base, load_tokenizer
    from svd_serve.quant import quantize_checkpoint
    from svd_serve.realmodel import smollm2
    from svd_serve.served import adapter_rank, aware_sweep, calibration
    from svd_serve.weights import Weights

    base = Path(args.base) if args.base else Path(smollm2())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(base)
    # calibration: training-like rows of another seed and general chat; held out: neither
    calib = write_jsonl(work / "calib.jsonl", chat_rows(args.calib_rows, seed=1) + read_jsonl(HELDOUT / "chat-calib.jsonl"))
    heldout = {"chat-eval (other questions)": rows_ids(read_jsonl(HELDOUT / "chat-eval.jsonl"), tokenizer),
               "task rows (seed 9)": rows_ids(chat_rows(32, seed=9), tokenizer)}
    print(f"base: {describe(base)}; {load_line()}", flush=True)
    print("evaluated in PyTorch: the dequantized served base (float32) plus the LoRA factors", flush=True)

    full = Weights(base)
    model = load_base(base)
    served_dirs = {}
    for scheme in args.schemes.split(","):
        served_dirs[scheme] = work / f"base-{scheme}"
        if not (served_dirs[scheme] / "config.json").is_file():
            quantize_checkpoint(base, served_dirs[scheme], scheme)
    served_w = {s: Weights(d) for s, d in served_dirs.items()}
    served_models = {s: load_base(d) for s, d in served_dirs.items()}
    ref_base = {h: next_token_logprobs(model, ids) for h, ids in heldout.items()}

    results = []
    for scheme, sm in served_models.items():
        for h, ids in heldout.items():
            kl, agree = compare(ref_base[h], next_token_logprobs(sm, ids))
            results.append(dict(method="(none)", scheme=scheme, variant="base alone", heldout=h, kl=kl, agree=agree))
            print(json.dumps(results[-1]), flush=True)

    for method in args.methods.split(","):
        options = {"select": "activation"} if method == "kasa" else {}
        adir = work / f"adapter-{method}-r{args.rank}-s{args.steps}"
        if not (adir / "svd_adapter.json").is_file():
            t = time.time()
            trained_adapter(base, adir, method, args.rank, args.targets, args.steps, options)
            print(f"trained {method} in {time.time() - t:.0f} s", flush=True)
        adapters = AdapterSet.load(adir, full)
        deltas = {n: d.factors for n, d in adapters.deltas().items()}
        r = adapter_rank(adapters)
        attach(model, {n: LowRankDelta(*d) for n, d in deltas.items()})
        ref = {h: next_token_logprobs(model, ids) for h, ids in heldout.items()}
        detach(model)
        covs = calibration(calib, base, list(deltas), deltas)
        for scheme, sm in served_models.items():
            variants = {"plain": (deltas, None)}
            labels = {0: "aware K=exact", r: "aware K=exact+r", 2 * r: "aware K=exact+2r"}
            t = time.time()
            sweep = aware_sweep(full, served_w[scheme], deltas, covs, [(None, extra) for extra in labels])
            print(f"{method} {scheme}: aware factors at {len(labels)} ranks in {time.time() - t:.0f} s", flush=True)
            for label, (factors, report) in zip(labels.values(), sweep):
                variants[label] = ({n: c.factors for n, c in factors.items()}, report["total"])
                print(f"{method} {scheme} {label}: calibration output error plain {report['total']['plain']:.4f} "
                      f"aware {report['total']['aware']:.4f}", flush=True)
            for label, (factors, total) in variants.items():
                attach(sm, {n: LowRankDelta(*f) for n, f in factors.items()})
                try:
                    for h, ids in heldout.items():
                        kl, agree = compare(ref[h], next_token_logprobs(sm, ids))
                        results.append(dict(method=method, scheme=scheme, variant=label, heldout=h, kl=kl,
                                            agree=agree, calib_error=None if total is None else total["aware"],
                                            calib_plain=None if total is None else total["plain"]))
                        print(json.dumps(results[-1]), flush=True)
                finally:
                    detach(sm)
        write(results, base, args, work)  # after every method: a partial table survives an interrupted run
    print(table(results, describe(base), args))


def write(results: list[dict], base: Path, args, work: Path) -> None:
    from benchlib import describe

    (work / "results.json").write_text(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table(results, describe(base), args))


def table(results: list[dict], base: str, args) -> str:
    lines = [f"Base: {base}. Adapters r = {args.rank}, {args.steps} steps, targets {args.targets}; "
             f"calibration: {args.calib_rows} task rows (seed 1) + tests/data/chat-calib.jsonl. Evaluated in "
             "PyTorch: the dequantized served base (float32) plus the factors, against the full-precision "
             "adapted model (for `base alone`: the full-precision base), on held-out rows.", "",
             "| method | base | variant | held-out rows | mean KL | top-1 agreement | KL removed vs plain |",
             "|---|---|---|---|---|---|---|"]
    plain = {(r["method"], r["scheme"], r["heldout"]): r["kl"] for r in results if r["variant"] == "plain"}
    for r in results:
        p = plain.get((r["method"], r["scheme"], r["heldout"]))
        removed = f"{1 - r['kl'] / p:+.0%}" if p and r["variant"].startswith("aware") else ""
        lines.append(f"| {r['method']} | {r['scheme']} | {r['variant']} | {r['heldout']} | {r['kl']:.2e} | "
                     f"{r['agree']:.4f} | {removed} |")
    lines += ["", "goals (aware K = exact + r removes ≥ half of the plain export's KL on held-out rows; no "
              "aware variant is worse than plain):"]
    for r in results:
        p = plain.get((r["method"], r["scheme"], r["heldout"]))
        if p and r["variant"] == "aware K=exact+r":
            lines.append(f"- {r['method']} {r['scheme']} {r['heldout']}: {1 - r['kl'] / p:.0%} removed "
                         f"{'PASS' if r['kl'] <= p / 2 else 'FAIL'}")
    worse = [r for r in results if r["variant"].startswith("aware")
             and r["kl"] > plain[(r["method"], r["scheme"], r["heldout"])]]
    lines.append(f"- aware worse than plain: {len(worse)} of "
                 f"{sum(r['variant'].startswith('aware') for r in results)} "
                 f"{'PASS' if not worse else 'FAIL: ' + ', '.join(r['method'] + ' ' + r['scheme'] + ' ' + r['variant'] for r in worse)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
