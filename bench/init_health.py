"""The init health check on SmolLM2-135M-Instruct: how much each method's init changes the model,
with minor components chosen by singular value (the papers) or by output energy (``-o select=activation``).

    python bench/init_health.py                       # both target sets, all rows
    python bench/init_health.py --targets q_proj,v_proj --rows 16 --tables

Eval rows: ``tests/data/chat-eval.jsonl`` (short chat turns, loss on the assistant tokens only).
Calibration rows (for CorDA and ``select=activation``): ``tests/data/chat-calib.jsonl``, other
general chat rows. Every configuration is measured by ``svd_serve.training.check_init`` on the model
as the training loop runs it (frozen terms absorbed into its copy of the base, float32, CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from svd_serve.adapter import AdapterSet, make_options  # noqa: E402
from svd_serve.calib import input_covariances  # noqa: E402
from svd_serve.dataset import encode, read_jsonl  # noqa: E402
from svd_serve.training import check_init  # noqa: E402
from svd_serve.model import absorb_frozen, load_base, resolve_targets  # noqa: E402
from svd_serve.realmodel import smollm2  # noqa: E402
from svd_serve.training import loss_sum  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CONFIGS = [("lora", {}), ("pissa", {}), ("corda-kpa", {}), ("milora", {}), ("milora", {"select": "activation"}),
           ("soma", {}), ("soma", {"select": "activation"}), ("kasa", {"select": "weight"}), ("kasa", {"select": "activation"})]


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["q_proj,v_proj", "all-linear"])
    p.add_argument("--rank", type=int, default=8, help="(SoMA keeps its own default, 16)")
    p.add_argument("--rows", type=int, default=40, help="eval rows (at most 40)")
    p.add_argument("--tables", action="store_true", help="print the check's table for every configuration")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    path = smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = load_base(path)
    examples = [encode(r, tok, 512) for r in read_jsonl(DATA / "chat-eval.jsonl")[: args.rows]]
    calib = read_jsonl(DATA / "chat-calib.jsonl")
    every = sorted({n for spec in args.targets for n in resolve_targets(model, spec)})
    covs = input_covariances(model, every, calib, tok)
    print(f"SmolLM2-135M-Instruct, {len(examples)} eval rows, {len(calib)} calibration rows, rank {args.rank}")

    v_names = [n for n in every if n.endswith("v_proj")]
    if v_names:
        sv = [torch.linalg.svdvals(model.get_submodule(n).weight.double()) for n in v_names]
        print(f"v_proj spectra: σ_max {min(float(s[0]) for s in sv):.2f}-{max(float(s[0]) for s in sv):.2f}, "
              f"the {args.rank} smallest {min(float(s[-args.rank:].min()) for s in sv):.2f}-"
              f"{max(float(s[-args.rank:].max()) for s in sv):.2f}")

    print(f"\n{'targets':14s} {'method':8s} {'select':10s} {'base loss':>9s} {'init loss':>9s} {'increase':>9s} "
          f"{'v_proj ‖ΔWx‖/‖Wx‖ mean':>22s} {'max':>7s} {'worst type':>10s} {'max':>7s}")
    for spec in args.targets:
        targets = resolve_targets(model, spec)
        for method, options in CONFIGS:
            adapted = copy.deepcopy(model)
            rank = None if method == "soma" else args.rank
            adapters = AdapterSet.create(adapted, method, make_options(method, rank, **options), targets,
                                         statistics=covs, progress=False)
            adapters.attach(adapted)
            absorb_frozen(adapted)
            lines: list[str] = []
            health = check_init(adapted, adapters, examples, tok.pad_token_id,
                                lambda b, m=adapted: loss_sum(m, b),
                                batch_size=8, limit=None, say=lines.append, rows=len(examples))
            v = [c for n, c in health.modules.items() if n.endswith("v_proj")]
            kind, _, _, worst, _ = health.by_type()[0]
            print(f"{spec:14s} {method:8s} {options.get('select', '-'):10s} {health.base_loss:9.4f} "
                  f"{health.init_loss:9.4f} {health.increase:+9.4f} {sum(v) / len(v):22.2e} {max(v):7.1e} "
                  f"{kind:>10s} {worst:7.1e}", flush=True)
            if args.tables:
                print("\n".join(lines) + "\n")
            del adapted, adapters


if __name__ == "__main__":
    main()
