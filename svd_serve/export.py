"""``svd-serve export``: adapters → exact low-rank ΔW against the original base → a target's files,
then a numerical check of what was written against the adapted model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapter import AdapterSet
from .converters import ExportedAdapter, ExportJob, get_target
from .errors import SvdServeError
from .io import check_out
from .model import LowRankDelta, linear_names, load_base


@torch.no_grad()
def logits_gap(model: nn.Module, first: dict[str, nn.Module], second: dict[str, nn.Module],
               seed: int = 0) -> float:
    """Max |logits| difference of ``model`` with two sets of per-module deltas, on random tokens."""
    from .model import attach, detach

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    outs = []
    for deltas in (first, second):
        attach(model, deltas)
        try:
            outs.append(model(input_ids=ids).logits.float())
        finally:
            detach(model)
    return float((outs[0] - outs[1]).abs().max())


def export(target: str, base: str | Path, adapter_dirs: list[str | Path], out: str | Path,
           max_rank: int | None = None, verify: bool = True, overwrite: bool = False, **options) -> dict:
    """Write ``adapter_dirs`` for ``target`` under ``out``; returns a report (ranks, errors, checks)."""
    convert = get_target(target).export
    if not adapter_dirs:
        raise SvdServeError("give at least one --adapter")
    if max_rank is not None and max_rank < 1:
        raise SvdServeError("--max-rank must be at least 1")
    names = [Path(p).name for p in adapter_dirs]
    if len(set(names)) != len(names):
        raise SvdServeError(f"adapter directory names must be distinct: {names}")
    check_out(out, [base, *adapter_dirs], overwrite)
    model = load_base(base)
    sets = [AdapterSet.load(p, model) for p in adapter_dirs]
    exported = [ExportedAdapter.from_adapter(n, p, s, max_rank) for n, p, s in zip(names, adapter_dirs, sets)]
    job = ExportJob(base=Path(base), adapters=exported, linear_modules=linear_names(model),
                    architecture=type(model).__name__, model_type=model.config.model_type,
                    options=options, overwrite=overwrite)
    written = dict(convert(job, Path(out)))
    messages = written.pop("messages") if isinstance(written.get("messages"), list) else []
    report = {"target": target, "out": str(out), "adapters": {}, "messages": messages}
    for e, s in zip(exported, sets):
        entry = {"rank": e.rank, "modules": len(e.A), "bound": max(l.rank_bound() for _, l in s.items()),
                 "max_rel_error": max(e.rel_error.values()), **written.get(e.name, {})}
        if verify:
            native = dict(s.items())
            lowrank = {n: LowRankDelta(e.A[n], e.B[n]) for n in e.A}
            entry["max_logit_gap"] = logits_gap(model, native, lowrank)
        report["adapters"][e.name] = entry
    return report
