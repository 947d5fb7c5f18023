from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank
from .base import Adapter, LoRAOptions, kaiming_, opt


@dataclass
class DiffoRAOptions(LoRAOptions):
    keep: float = opt(0.5, "Fraction ρ of the adapted modules kept when the gates are discretised: the "
                           "k = max(1, ⌊ρ·N + ½⌋) modules with the largest gates (N = all adapted modules).",
                      gt=0, lt=1)
    search: float = opt(0.25, "Fraction of the training steps during which the gates are learned with the LoRA "
                              "factors; the discretisation happens after update max(1, ⌊search·steps + ½⌋).",
                        gt=0, lt=1)


class DiffoRA(Adapter):
    """Differentiable module selection (DiffoRA's Differential Adaptation Matrix), then LoRA on the
    modules chosen. Every adapted module ``i`` has a LoRA ``s·B_i A_i`` (A kaiming, B = 0) and a gate
    logit ``α_i`` (0 at init):

        search (first ``search`` of the steps):  ΔW_i = σ(α_i) · s·B_i A_i      (γ_i = σ(α_i))
        then:                                    ΔW_i = s·B_i A_i if i is kept, else exactly 0

    The DAM is diag(γ_1 … γ_N); its binary entries (adapt module i or not) are relaxed to
    ``γ_i = σ(α_i)``, which is the DARTS softmax over the two candidates {LoRA, no adapter} with the
    logit of the second fixed at 0. At the end of the search the decision is taken across ALL modules
    of the set at once (:meth:`after_step_all`): the ``k`` largest gates (ties: the earlier module) are
    set to 1, the others to 0 — the discretisation of the paper. The LoRA factors learned during the
    search are kept (the paper's weight sharing between the relaxed and the discrete model), so
    "ordinary low-rank training on the chosen modules" continues from them.

    Choices where the paper leaves room:

    - the gates and the LoRA factors are learned jointly on the same batches by the one optimizer
      (single-level), not by DARTS' alternating bi-level scheme on a held-out split: the training
      loop has one data stream, and the gates only have to rank the modules;
    - at the discretisation a kept module's gate value is folded into its B (``B ← σ(α_i)·B``) before
      the gate becomes 1, so its ΔW is unchanged and the model changes only by the modules switched
      off (setting γ = 1 alone would rescale every kept update by 1/σ(α_i), about 2×, in one step);
    - a switched-off module stays in the adapter with ΔW = 0 exactly (its B is multiplied by 0):
      the set of targets, the checkpoint format and the optimizer stay as they were, and exports
      write it as a zero module (which every target accepts and costs nothing to apply in vLLM).

    The decision lives in buffers (``decided``, ``on``), so checkpoints and resume carry it.
    """

    name = "diffora"
    paper = ("DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation "
             "(Jiang, Wang, Yuan, 2025, arXiv:2502.08905)")
    Options = DiffoRAOptions

    def build(self) -> None:
        self.A = nn.Parameter(torch.zeros(self.opts.rank, self.n))
        self.B = nn.Parameter(torch.zeros(self.m, self.opts.rank))
        self.logit = nn.Parameter(torch.zeros(()))
        self.register_buffer("decided", torch.zeros(()))  # 1 once the gates are discretised
        self.register_buffer("on", torch.ones(()))  # the discrete gate: 1 kept, 0 switched off

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        kaiming_(self.A)
        self.B.zero_()
        self.logit.zero_()
        self.decided.zero_()
        self.on.fill_(1.0)

    def gate(self) -> torch.Tensor:
        """γ: σ(α) while searching, then the discrete 0 or 1 (no host sync: a ``where``)."""
        return torch.where(self.decided > 0, self.on, torch.sigmoid(self.logit))

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * (self.scale * self.gate()))

    def rank_bound(self) -> int:
        """r (0 for a module switched off)"""
        return 0 if bool(self.decided) and not bool(self.on) else self.opts.rank

    @staticmethod
    def kept(n: int, keep: float) -> int:
        """How many of ``n`` modules the discretisation keeps: ``max(1, ⌊keep·n + ½⌋)``."""
        return max(1, int(keep * n + 0.5))

    @staticmethod
    def decision_step(total_steps: int, search: float) -> int:
        """The update after which the gates are discretised: ``max(1, ⌊search·steps + ½⌋)``."""
        return max(1, int(search * total_steps + 0.5))

    @classmethod
    @torch.no_grad()
    def after_step_all(cls, layers: dict[str, "DiffoRA"], step: int, total_steps: int) -> None:
        """At :meth:`decision_step`, keep the modules with the :meth:`kept` largest gate logits (σ is
        monotone) of the whole set, switch the others off; once only."""
        if not layers:
            return
        first = next(iter(layers.values()))
        if bool(first.decided) or step < cls.decision_step(total_steps, first.opts.search):
            return
        logits = torch.stack([layer.logit.detach().float().cpu() for layer in layers.values()])
        order = torch.argsort(logits, descending=True, stable=True)
        chosen = set(order[: cls.kept(len(layers), first.opts.keep)].tolist())
        for i, layer in enumerate(layers.values()):
            if i in chosen:
                layer.B.mul_(torch.sigmoid(layer.logit))  # the same ΔW with γ = 1
                layer.on.fill_(1.0)
            else:
                layer.on.zero_()
            layer.decided.fill_(1.0)
