"""Weighted truncation: an adapter's exact ΔW (rank ≤ 2r) written at ranks r/4, r/2 and r, plainly
(Frobenius) or weighted by the Fisher information or the input covariance of the adapted model on
calibration data, as ``export --max-rank K --weighting W --calib-data FILE`` does.

Per weighting and rank: the mean over modules of the relative Frobenius error and of the relative
output error on the calibration inputs; on held-out task rows the greedy agreement with the exact
adapter (the share of greedy tokens equal to the exact adapter's before the first difference, over
``--new-tokens`` tokens per prompt) and the mean cross-entropy of the completions.

    python -m bench.weighted_truncation --base BASE --adapter ADAPTER --calib-data calib.jsonl \\
        --heldout test.jsonl --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


@torch.no_grad()
def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        new: list[int] = []
        for _ in range(new_tokens):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        out.append(new)
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Mean share of tokens equal to the reference's before the first difference."""
    shares = []
    for ref, got in zip(reference, other):
        same = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), len(ref))
        shares.append(same / len(ref))
    return sum(shares) / len(shares)


@torch.no_grad()
def heldout_loss(model, tokenizer, rows: list[dict]) -> float:
    from svd_serve.dataset import collate, encode
    from svd_serve.training import loss_sum

    total, count = 0.0, 0
    for i in range(0, len(rows), 32):
        s, n = loss_sum(model, collate([encode(r, tokenizer, 256) for r in rows[i:i + 32]], tokenizer.pad_token_id))
        total, count = total + float(s), count + int(n)
    return total / count


def prompt_ids(row: dict, tokenizer) -> list[int]:
    """A row's tokens before its first target token (the prompt, or the chat up to the assistant turn)."""
    from svd_serve.dataset import IGNORE, encode

    ex = encode(row, tokenizer, 256)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    return ex.input_ids[:first]


def measure(base: Path, adapter: Path, calib: Path, heldout: list[dict], ranks: list[int],
            new_tokens: int, prompts_n: int) -> list[dict]:
    from svd_serve.adapter import AdapterSet
    from svd_serve.calib import WEIGHTINGS, truncation_weights
    from svd_serve.model import LowRankDelta, attach, detach, load_base, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_base(base).eval()
    adapters = AdapterSet.load(adapter, model)
    exact = {n: d.factors for n, d in adapters.deltas().items()}
    # what `export --weighting fisher --calib-data` computes: covariances (every weighting's output
    # error) and Fisher rows of the base with the exact ΔW, once
    stats = truncation_weights("fisher", calib, base, list(exact), exact)
    prompts = [prompt_ids(r, tokenizer) for r in heldout[:prompts_n]]
    attach(model, {n: LowRankDelta(*f) for n, f in exact.items()})
    try:
        reference = greedy(model, prompts, new_tokens)
        exact_loss = heldout_loss(model, tokenizer, heldout)
    finally:
        detach(model)
    base_loss = heldout_loss(model, tokenizer, heldout)
    rows = [{"weighting": "base (no adapter)", "rank": 0, "frobenius": 1.0, "output": 1.0,
             "agreement": agreement(reference, greedy(model, prompts, new_tokens)), "loss": base_loss},
            {"weighting": "exact", "rank": max(d.rank for d in adapters.deltas().values()),
             "frobenius": 0.0, "output": 0.0, "agreement": 1.0, "loss": exact_loss}]
    print(json.dumps(rows[0]), flush=True)
    print(json.dumps(rows[-1]), flush=True)
    for kind in WEIGHTINGS:
        weights = dataclasses.replace(stats, kind=kind)
        for k in ranks:
            deltas = adapters.deltas(k, weights)
            attach(model, {n: LowRankDelta(d.A, d.B) for n, d in deltas.items()})
            try:
                row = {"weighting": kind, "rank": k,
                       "frobenius": sum(d.rel_error for d in deltas.values()) / len(deltas),
                       "output": sum(d.output_error for d in deltas.values()) / len(deltas),
                       "agreement": agreement(reference, greedy(model, prompts, new_tokens)),
                       "loss": heldout_loss(model, tokenizer, heldout)}
            finally:
                detach(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| weighting | rank | Frobenius error | output error | greedy agreement | held-out loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weighting']} | {r['rank']} | {r['frobenius']:.3f} | {r['output']:.3f} | "
                     f"{100 * r['agreement']:.1f} % | {r['loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from svd_serve.dataset import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--calib-data", type=Path, required=True)
    ap.add_argument("--calib-rows", type=int, default=64)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--heldout-rows", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts for the greedy agreement")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--ranks", default=None, help="comma list (default: r/4, r/2, r of the adapter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = json.loads((args.adapter / "svd_adapter.json").read_text())["options"]["rank"]
    ranks = [int(k) for k in args.ranks.split(",")] if args.ranks else [max(1, r // 4), max(1, r // 2), r]
    calib = args.out.with_suffix(".calib.jsonl")
    calib.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(args.calib_data)[:args.calib_rows]))
    rows = measure(args.base, args.adapter, calib, read_jsonl(args.heldout)[:args.heldout_rows], ranks,
                   args.new_tokens, args.prompts)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
