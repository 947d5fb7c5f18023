"""``svd-serve merge --method atlas``: task vectors with learned anisotropic scaling (aTLAS).

Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling" (NeurIPS
2024, arXiv:2407.02880): with task vectors ``τ_t = θ_t − θ0`` split into parameter blocks ``τ_{t,b}``,

    θ = θ0 + Σ_t Σ_b λ_{t,b} τ_{t,b}

and the coefficients ``λ`` — nothing else — learned by gradient descent on a little labelled data
(the paper's supervised few-shot setting; the loss here is the training loop's cross-entropy).

Here a task vector is an adapter's exact ΔW against the original base, and a block is one adapted
module (an adapter touches Linear weights only, so the paper's other blocks — biases, norms — carry
no task vector). With ``per_component`` a block is one singular component of ``τ_{t,b}``: in SVD
form ``τ_{t,b} = Σ_i σ_i u_i v_iᵀ`` each component gets its own ``λ_{t,b,i}``, a finer anisotropy
the issue asks for (the paper's finer variant splits blocks into random parameter partitions, which
would not keep ΔW low-rank). Either way the merged

    ΔW_b = Σ_t B_t diag(λ_t) A_t = [B_1 … B_T] diag(λ) [A_1; …; A_T]

is exact and low-rank (rank ≤ Σ_t rank τ_{t,b}), so it folds or compresses like any merge.

How it is learned: an :class:`Atlas` layer per module holds the task vectors as frozen balanced SVD
factors (``A = √S Vᵀ``, ``B = U √S``, :func:`svd_serve.linalg.compress`) and trains only ``λ``; the
set of them is an ordinary :class:`AdapterSet` trained by the training loop itself
(:func:`svd_serve.training.start`, ``fit``, ``evaluate``), not a second loop. The coefficients start at
``lam · w_t`` (``--lambda``, ``--weights``; default 1: task arithmetic), which is where the paper's
task-arithmetic baseline sits, so the learned merge is compared with the merge it started from.
The few-shot loss is reported at the start and at the end (on the same rows: they are the only
labelled data the merge sees).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapter import AdapterConfig, AdapterSet
from .dataset import read_jsonl
from .errors import SvdServeError
from .linalg import LowRank, compress
from .methods.base import Adapter, Options, opt
from .training import TrainConfig, check_config, evaluate, fit, start


@dataclass
class AtlasSettings:
    """How the coefficients are learned (the CLI reads these defaults)."""

    data: str  # JSONL in a training format: the few labelled rows
    per_component: bool = False  # one λ per singular component (default: per task vector and module)
    steps: int | None = None  # optimizer steps (None: ``epochs`` epochs)
    epochs: float = 5.0
    lr: float = 5e-2
    batch_size: int = 4
    max_length: int = 512
    progress: bool = True

    def train_config(self, base: str | Path, out: str | Path, seed: int) -> TrainConfig:
        return TrainConfig(base=str(base), data=str(self.data), out=str(out), method=Atlas.name,
                           eval_data=str(self.data), steps=self.steps, epochs=None if self.steps is not None else self.epochs,
                           lr=self.lr, batch_size=self.batch_size, max_length=self.max_length, seed=seed,
                           progress=self.progress)

    def check(self, base: str | Path, seed: int = 0) -> None:
        """Refuse bad settings before any work (the training loop's own checks, and the rows)."""
        check_config(self.train_config(base, "unused", seed), Atlas)
        read_jsonl(self.data)


@dataclass
class AtlasOptions(Options):
    tasks: int = opt(1, "Task vectors combined.", ge=1)
    rank: int = opt(1, "Components held per task vector and module (its exact rank, zero-padded).", ge=1)
    per_component: bool = opt(False, "One coefficient per singular component (else one per task vector).")


class Atlas(Adapter):
    """One module of an aTLAS merge: the task vectors' frozen SVD factors, task ``t`` in slot
    ``[t·rank, (t+1)·rank)``, and the trainable coefficients ``coef`` ([tasks], or [tasks·rank]
    with ``per_component``): ``ΔW = B diag(λ) A`` with λ the coefficient of each component's task
    (or its own). Not a training method of its own (it is not in the method registry): it is made
    from task vectors by :func:`combination`."""

    name = "atlas"
    paper = "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (Zhang et al., NeurIPS 2024, arXiv:2407.02880)"
    Options = AtlasOptions

    def check(self) -> None:
        """Any shape: the slots hold whatever rank the task vectors have."""

    def build(self) -> None:
        size = self.opts.tasks * self.opts.rank
        self.register_buffer("A", torch.zeros(size, self.n))
        self.register_buffer("B", torch.zeros(self.m, size))
        self.coef = nn.Parameter(torch.ones(size if self.opts.per_component else self.opts.tasks))

    def init(self, weight, stat=None) -> None:
        raise SvdServeError("an atlas layer is made from task vectors (Atlas.set_tasks), not from a base weight")

    @torch.no_grad()
    def set_tasks(self, taus: list[LowRank], coeffs: list[float]) -> None:
        """Task ``t``'s ΔW ``taus[t]`` in balanced SVD form (exact rank) into slot ``t``, and every
        coefficient of task ``t`` set to ``coeffs[t]``."""
        if len(taus) != self.opts.tasks or len(coeffs) != self.opts.tasks:
            raise ValueError(f"{len(taus)} task vectors and {len(coeffs)} coefficients for {self.opts.tasks} tasks")
        r = self.opts.rank
        self.A.zero_()
        self.B.zero_()
        for t, tau in enumerate(taus):
            svd = compress(*tau)
            if svd.rank > r:
                raise ValueError(f"task vector {t} has rank {svd.rank} > {r} slots")
            self.A[t * r: t * r + svd.rank] = svd.A[: svd.rank]
            self.B[:, t * r: t * r + svd.rank] = svd.B[:, : svd.rank]
        start = torch.tensor(coeffs, dtype=self.coef.dtype)
        self.coef.copy_(start.repeat_interleave(r) if self.opts.per_component else start)

    def coefficients(self) -> Tensor:
        """λ of every component slot, [tasks·rank]."""
        return self.coef if self.opts.per_component else self.coef.repeat_interleave(self.opts.rank)

    def trainable_factors(self) -> LowRank:
        return LowRank(self.A, self.B * self.coefficients())

    def rank_bound(self) -> int:
        """Σ_t rank τ_t"""
        return self.opts.tasks * self.opts.rank


def combination(task_vectors: dict[str, list[LowRank]], coeffs: list[float], per_component: bool,
                architecture: str, fingerprint: str, base_model: str = "") -> AdapterSet:
    """The :class:`Atlas` layers of every module (``task_vectors[name][t]``: task ``t``'s ΔW there,
    a zero one where the adapter lacks the module), coefficients starting at ``coeffs``."""
    names = list(task_vectors)
    tasks = len(coeffs)
    rank = max(1, max(compress(*tau).rank for taus in task_vectors.values() for tau in taus))
    opts = AtlasOptions(tasks=tasks, rank=rank, per_component=per_component)
    config = AdapterConfig(method=Atlas.name, options=dataclasses.asdict(opts),
                           targets={n: [task_vectors[n][0].B.shape[0], task_vectors[n][0].A.shape[1]] for n in names},
                           target_spec="", architecture=architecture, base_fingerprint=fingerprint,
                           base_model=str(base_model))
    adapters = AdapterSet(config, method=Atlas)
    for name, layer in adapters.items():
        layer.set_tasks(task_vectors[name], coeffs)
    return adapters


@dataclass
class Learned:
    """What :func:`learn` returns."""

    factors: dict[str, LowRank]  # the merged ΔW of every module, float32 on the CPU
    coefficients: dict[str, Tensor]  # per module: λ [tasks], or [tasks, rank] per component
    loss_start: float  # few-shot loss (cross-entropy per target token) at the initial coefficients
    loss: float  # and at the learned ones
    steps: int

    def summary(self) -> dict:
        """The report's entry: losses, steps, the number of coefficients and each task's mean λ."""
        stacked = torch.stack([c.reshape(c.shape[0], -1).mean(1) for c in self.coefficients.values()])
        return {"loss_start": self.loss_start, "loss": self.loss, "steps": self.steps,
                "coefficients": sum(c.numel() for c in self.coefficients.values()),
                "mean_lambda": [round(float(x), 6) for x in stacked.mean(0)]}


def learn(base: str | Path, task_vectors: dict[str, list[LowRank]], coeffs: list[float], settings: AtlasSettings,
          architecture: str, fingerprint: str, seed: int = 0) -> Learned:
    """Learn the coefficients on ``settings.data`` with the training loop, starting from ``coeffs``
    (one per task); the run's records go to a temporary directory."""
    adapters = combination(task_vectors, coeffs, settings.per_component, architecture, fingerprint, str(base))
    with tempfile.TemporaryDirectory(prefix="svd-serve-atlas-") as tmp:
        run = start(settings.train_config(base, Path(tmp) / "run", seed), adapters)
        loss_start = evaluate(run)
        fit(run)
        loss = evaluate(run)
    adapters.cpu()
    layers = dict(adapters.items())
    factors = {name: layer.delta() for name, layer in layers.items()}
    coefficients = {name: layer.coef.detach().float().reshape(layer.opts.tasks, -1) if settings.per_component
                    else layer.coef.detach().float().clone() for name, layer in layers.items()}
    return Learned(factors, coefficients, loss_start, loss, run.total_steps)
