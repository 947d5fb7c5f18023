from __future__ import annotations

from dataclasses import dataclass

from ..linalg import LowRank
from .base import RankOptions, opt
from .lora import LoRA


@dataclass
class DeltaOptions(RankOptions):
    rank: int = opt(8, "Components per module (modules of a smaller rank are zero-padded).", ge=1)


class Delta(LoRA):
    """A fixed low-rank update ``ΔW = B A`` with scale 1: what ``merge``, ``import`` and ``extract``
    write. ``rank`` is the number of components of every module; modules whose own rank is smaller
    are zero-padded, so it may exceed ``min(out, in)`` of some module (the exporters drop the
    padding). ``init`` sets A kaiming / B zero like LoRA; the writers fill A and B directly."""

    name = "delta"
    paper = "a fixed ΔW = B A (merged, imported from PEFT, or extracted from a full fine-tune)"
    Options = DeltaOptions

    def check(self) -> None:
        """Any rank ≥ 1 (the schema's range): padding may exceed ``min(out, in)``."""

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B)

    def rank_bound(self) -> int:
        """rank"""
        return self.opts.rank
