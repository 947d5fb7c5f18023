from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import LowRank, factored_svd, top_svd
from .base import Adapter, RankOptions, opt


@dataclass
class SSTOptions(RankOptions):
    rank: int = opt(8, "Singular vector pairs (u_i, v_i) updated per step, sampled by singular value.", ge=1)
    sample_every: int = opt(1, "Steps between two samplings of the updated vectors.", ge=1)
    refactor_every: int = opt(100, "Steps between two re-factorisations U Σ Vᵀ ← SVD(U Σ Vᵀ).", ge=1)


class SST(Adapter):
    """Sparse Spectral Training: the weight becomes ``W' = U diag(σ) Vᵀ`` (all k = min(m, n) singular
    triplets of W at init), and training updates every singular value but only r sampled pairs of
    singular vectors at a time:

        ΔW = U diag(σ) Vᵀ − U0 diag(σ0) V0ᵀ            rank ≤ k (full rank)

    Followed from the paper (no reference code used):

    - sampling: r indices drawn without replacement with probability ∝ |σ_i| (multinomial), every
      ``sample_every`` steps; the sample is a function of a per-layer seed and the step, so a resumed
      or data-parallel run draws the same one;
    - the enhanced gradient of the sampled vectors, ``∂L/∂u_i = G v_i`` and ``∂L/∂v_i = Gᵀ u_i`` with
      ``G = ∂L/∂W'`` (the chain rule would multiply both by σ_i); σ gets its true gradient
      ``u_iᵀ G v_i``. It is built into :meth:`trainable_factors`: two terms of value exactly zero,
      ``(U_I − sg U_I) sg V_Iᵀ`` and ``sg U_I (V_I − sg V_I)ᵀ`` (sg: no gradient), carry it;
    - every ``refactor_every`` steps the factors, which training moves off orthonormality, are
      replaced by the SVD of their product (ΔW changes by rounding only), then vectors are re-sampled.

    The sampled vectors are the trainable tensors ``Us [m, r]`` and ``Vs [r, n]`` (the paper's
    memory-efficient form); the others wait in buffers. After each step they are written back. Adam
    state, honestly handled: when the sample changes or the factors are re-factorised, the optimizer
    state of ``Us``/``Vs`` (and of σ at a re-factorisation) is reset (:meth:`reset_optimizer_state`):
    its moments describe vectors that are no longer there. With the default ``sample_every=1`` this
    makes every vector update a first Adam step (lr · sign of the gradient, per entry); a larger
    ``sample_every`` lets the moments build up over that many steps.

    Memory: the factors of W (``m·k + k·n``) twice, trainable and at init, as full fine-tuning of
    those modules would; fine for a test, several times a LoRA on a large model.
    """

    name = "sst"
    paper = ("Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks "
             "(SST; Zhao et al., 2024, arXiv:2405.15481)")
    Options = SSTOptions
    full_rank = True

    def build(self) -> None:
        m, n, k, r = self.m, self.n, self.k, self.opts.rank
        self.sigma = nn.Parameter(torch.zeros(k))
        self.Us = nn.Parameter(torch.zeros(m, r))
        self.Vs = nn.Parameter(torch.zeros(r, n))
        self.register_buffer("U", torch.zeros(m, k))  # current vectors (columns idx live in Us)
        self.register_buffer("Vh", torch.zeros(k, n))  # current vectors (rows idx live in Vs)
        self.register_buffer("idx", torch.arange(r))  # the sampled indices
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))
        self.register_buffer("U0", torch.zeros(m, k))
        self.register_buffer("sigma0", torch.zeros(k))
        self.register_buffer("Vh0", torch.zeros(k, n))

    @torch.no_grad()
    def init(self, weight, stat=None) -> None:
        u, s, vh = top_svd(weight, self.k)
        for buf, value in ((self.U, u), (self.U0, u), (self.Vh, vh), (self.Vh0, vh), (self.sigma0, s)):
            buf.copy_(value)
        self.sigma.copy_(s)
        self.seed.fill_(int(torch.randint(0, 2**24, ())))  # exact in the float32 the adapter files hold
        self.resample(0)

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, Vh)`` with the sampled vectors in place (no gradient)."""
        return (self.U.index_copy(1, self.idx, self.Us.detach()),
                self.Vh.index_copy(0, self.idx, self.Vs.detach()))

    def trainable_factors(self) -> LowRank:
        u, vh = self.current()
        us, vs = self.Us.detach(), self.Vs.detach()
        return LowRank.cat([LowRank(vh, u * self.sigma),  # the value; gradient to σ
                            LowRank(vs, self.Us - us),  # zero; ∂/∂Us = G Vsᵀ
                            LowRank(self.Vs - vs, us)])  # zero; ∂/∂Vs = Usᵀ G

    def frozen_factors(self) -> LowRank:
        return LowRank(self.Vh0, self.U0 * -self.sigma0)

    def rank_bound(self) -> int:
        """k = min(out, in)"""
        return self.k

    @torch.no_grad()
    def sample(self, step: int) -> torch.Tensor:
        """The r indices of step ``step``: multinomial by |σ|, without replacement."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + step)
        p = self.sigma.detach().abs().double().cpu().clamp_min(torch.finfo(torch.float64).tiny)
        return torch.multinomial(p, self.opts.rank, replacement=False, generator=g).to(self.idx.device)

    @torch.no_grad()
    def resample(self, step: int) -> None:
        self.idx.copy_(self.sample(step))
        self.Us.copy_(self.U[:, self.idx])
        self.Vs.copy_(self.Vh[self.idx])

    @torch.no_grad()
    def refactor(self) -> None:
        """``U diag(σ) Vᵀ ← SVD(U diag(σ) Vᵀ)``, from the factors (no m×n product)."""
        u, s, vh = factored_svd(self.Vh, self.U * self.sigma)
        self.U.copy_(u)
        self.sigma.copy_(s)
        self.Vh.copy_(vh)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.U[:, self.idx] = self.Us
        self.Vh[self.idx] = self.Vs
        refactor = step % self.opts.refactor_every == 0
        if refactor:
            self.refactor()
            self.reset_optimizer_state(self.sigma)
        if refactor or step % self.opts.sample_every == 0:
            self.resample(step)
            self.reset_optimizer_state(self.Us, self.Vs)
