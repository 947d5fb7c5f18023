from __future__ import annotations

from ..errors import SvdServeError
from ..linalg import LowRank
from .lora import LoRA


class Delta(LoRA):
    """A fixed low-rank update ``ΔW = B A`` with scale 1: what ``merge``, ``import`` and ``extract``
    write. ``rank`` is the number of components of every module; modules whose own rank is smaller
    are zero-padded, so it may exceed ``min(out, in)`` of some module (the exporters drop the
    padding). ``init`` sets A kaiming / B zero like LoRA; the writers fill A and B directly."""

    name = "delta"
    paper = "a fixed ΔW = B A (merged, imported from PEFT, or extracted from a full fine-tune)"
    alpha_per_rank = 1.0
    uses_rank = False  # any rank ≥ 1 is valid, not only [1, min(out, in) - 1]

    def build(self) -> None:
        if self.opts.rank < 1:
            raise SvdServeError(f"delta: rank {self.opts.rank} must be at least 1")
        super().build()

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B)
