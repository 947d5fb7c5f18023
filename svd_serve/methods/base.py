"""What every adapter method is: an options schema, init from a base weight, forward, regularizer,
a per-step hook, and the exact low-rank ΔW.

One ``Adapter`` instance sits beside one ``nn.Linear`` (weight ``W [m, n] = [out, in]``) and adds
its correction to the base output. The whole design rests on one rule: at every moment the adapted
layer computes ``(W + ΔW) x`` where ``ΔW = B @ A`` is available in low-rank form through
:meth:`Adapter.delta`, against the ORIGINAL ``W``. Methods that "rewrite the base" (PiSSA's residual,
KaSA's truncation) express that rewrite as a frozen low-rank term instead of touching ``W``.

A method's options dataclass is its whole schema (:mod:`svd_serve.schema`): each field's type,
default and :func:`opt` metadata (doc, valid range, whether it weights a regularizer). Parsing
``-o KEY=VALUE``, validation, ``--reg`` and ``svd-serve methods`` are derived from it; a key the
dataclass lacks is refused.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import SvdServeError
from ..linalg import LowRank
from ..schema import Options, opt

def rank_opt(default: int = 8) -> Any:
    return opt(default, "Adapter rank r.", ge=1)


def alpha_opt(default: float | None = None) -> Any:
    return opt(default, "LoRA alpha: the update is scaled by alpha / rank.", gt=0)


def niter_opt() -> Any:
    return opt(None, "none: exact SVD; an integer: randomized SVD with that many power iterations (a faster, "
                     "approximate init: see linalg.top_svd).", ge=0)


@dataclass
class RankOptions(Options):
    rank: int = rank_opt()


@dataclass
class LoRAOptions(RankOptions):
    """``rank`` and ``alpha``; ``alpha=None`` means the method's ``alpha_per_rank · rank``."""

    alpha: float | None = alpha_opt()


class Adapter(nn.Module):
    """Base class of a method. Subclasses set the class attributes and implement ``build``/``init``
    and the factors; ``check``, ``regularizer``, ``rank_bound`` and ``after_step`` have defaults."""

    name: ClassVar[str]
    paper: ClassVar[str]
    bound: ClassVar[str]  # the rank bound of ΔW as text, for `svd-serve methods`: rank_bound's docstring
    Options: ClassVar[type[Options]] = LoRAOptions
    alpha_per_rank: ClassVar[float] = 2.0
    needs_calibration: ClassVar[bool] = False
    # what init() receives per module as its second argument when needs_calibration (calib.STATISTICS):
    # "covariance" ([n, n] input covariance) or "fisher" ([m] Fisher information per output row)
    statistic: ClassVar[str] = "covariance"
    full_rank: ClassVar[bool] = False  # ΔW is not low-rank: `svd-serve methods` says how to serve it

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.bound = inspect.getdoc(cls.rank_bound).splitlines()[0]

    def __init__(self, out_features: int, in_features: int, opts: Options):
        super().__init__()
        self.m, self.n, self.opts = out_features, in_features, opts
        self.k = min(out_features, in_features)
        self._stale: list[nn.Parameter] = []  # see reset_optimizer_state
        self.check()
        self.build()

    # --- to implement -------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse options this layer's shape cannot take. Default: a rank below ``min(out, in)``."""
        if isinstance(self.opts, RankOptions) and not self.opts.rank < self.k:
            raise SvdServeError(
                f"{self.name}: rank {self.opts.rank} must be in [1, min(out, in) - 1] = [1, {self.k - 1}] "
                f"for a {self.m}x{self.n} layer")

    def build(self) -> None:
        """Allocate parameters (trainable) and buffers (frozen), values not yet meaningful."""
        raise NotImplementedError

    @torch.no_grad()
    def init(self, weight: Tensor, stat: Tensor | None = None) -> None:
        """Set every tensor from the base weight (float32 ``[m, n]``) and, if given, the module's
        calibration statistic ``stat`` (float64; the one :attr:`statistic` names: the input covariance
        ``[n, n]`` or the Fisher row sums ``[m]``)."""
        raise NotImplementedError

    def trainable_factors(self) -> LowRank:
        """The part of ΔW that depends on trainable parameters, differentiable, scale included."""
        raise NotImplementedError

    def frozen_factors(self) -> LowRank | None:
        """The constant part of ΔW (a residual base, dropped components), or None."""
        return None

    def regularizer(self) -> Tensor | None:
        """This layer's weighted regularization term (coefficients from the options), or None."""
        return None

    def rank_bound(self) -> int:
        """2r

        The largest possible rank of ΔW. The first line of this docstring is that bound as text, as
        ``svd-serve methods`` shows it (:attr:`bound`); a method that overrides this states its own."""
        return 2 * self.opts.rank

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called by the training loop for every layer after each optimizer step (``step`` updates
        done of ``total_steps``), gradients still in place. No-op by default; a method that prunes or
        re-factors its parameters does it here (and names the parameters it re-factored with
        :meth:`reset_optimizer_state`). State it keeps must live in parameters or buffers
        (so checkpoints and resume carry it), and it must not change :meth:`frozen_factors` (the run
        may have added them to its copy of the base weights)."""

    @classmethod
    def needs_calibration_for(cls, opts) -> bool:
        """Whether :meth:`init` needs the calibration statistic with these options."""
        return cls.needs_calibration

    @classmethod
    def uses_calibration_for(cls, opts) -> bool:
        """Whether :meth:`init` uses the calibration statistic with these options where one is at hand:
        where it needs one, and where it takes one if given (KaSA's default ``select``; the training
        loop then computes it over the training rows when there is no --calib-data)."""
        return cls.needs_calibration_for(opts)

    @classmethod
    @torch.no_grad()
    def after_step_all(cls, layers: dict[str, "Adapter"], step: int, total_steps: int) -> None:
        """The per-step hook of a whole adapter set (module name → layer), called by the training loop
        once after each optimizer step. By default it calls every layer's :meth:`after_step`; a method
        whose decision spans all modules (a top-k over modules, a global budget) overrides it, under
        the same rules as :meth:`after_step`, and must decide the same way on every process (it sees
        the same layers there)."""
        for layer in layers.values():
            layer.after_step(step, total_steps)

    def reset_optimizer_state(self, *params: nn.Parameter) -> None:
        """For :meth:`after_step`: the values of ``params`` were replaced (re-sampled, re-factorised),
        so the optimizer state kept for them (Adam's moments and step count) no longer describes them.
        The training loop drops that state right after the hook; the optimizer starts it afresh at the
        next step, as for a new parameter."""
        self._stale.extend(params)

    def pop_stale(self) -> list[nn.Parameter]:
        """The parameters :meth:`reset_optimizer_state` named since the last call (then forgotten)."""
        stale, self._stale = self._stale, []
        return stale

    # --- shared ----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """``alpha / rank`` (methods with :class:`LoRAOptions`)."""
        alpha = self.opts.alpha if self.opts.alpha is not None else self.alpha_per_rank * self.opts.rank
        return alpha / self.opts.rank

    def forward(self, x: Tensor) -> Tensor:
        """The correction ``ΔW x`` (the wrapper adds it to the base output)."""
        trainable = self.trainable_factors()
        xa = x.to(trainable.A.dtype)
        out = trainable.apply(xa)
        frozen = self.frozen_factors()
        if frozen is not None:
            out = out + frozen.apply(xa)
        return out.to(x.dtype)

    @torch.no_grad()
    def delta(self) -> LowRank:
        """Exact factors ``(A, B)`` of ``W_adapted − W_original`` (rank ≤ :meth:`rank_bound`)."""
        trainable, frozen = self.trainable_factors(), self.frozen_factors()
        return (LowRank.cat([trainable, frozen]) if frozen is not None else trainable).float()

    @classmethod
    def describe(cls, width: int = 100) -> str:
        """What ``svd-serve methods`` prints: the paper, ΔW's rank bound, whether calibration data is
        needed, and every option with its type, default and doc (from the options schema)."""
        head = [f"{cls.name}  {cls.paper}",
                f"    ΔW rank ≤ {cls.bound}" + (f"; needs --calib-data ({cls.statistic})" if cls.needs_calibration else "")]
        if cls.full_rank:
            head.append(textwrap.fill(
                "ΔW is full-rank, not a small LoRA: serve it folded (`fold`), or as the best rank-K "
                "approximation with its error reported (`export --max-rank K`, or `extract --max-rank K` "
                "from the folded model).", width, initial_indent="    ", subsequent_indent="    "))
        rows = []
        for name, f in cls.Options.fields().items():
            kind, optional = cls.Options.kind(name)
            default = f.default
            if name == "alpha" and default is None:
                default = f"{cls.alpha_per_rank:g}·rank"
            doc = ("Regularizer weight (also --reg). " if f.metadata.get("reg") else "") + f.metadata["doc"]
            shape = "|".join(f.metadata["choices"]) if f.metadata.get("choices") else kind.__name__
            rows.append((f"-o {name}={_show(default)}", shape + ("|none" if optional else ""), doc))
        if not rows:
            return "\n".join(head + ["    no options"])
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        indent = " " * (4 + w0 + 2 + w1 + 2)
        for a, b, doc in rows:
            text = textwrap.fill(doc, width, initial_indent=f"    {a:{w0}s}  {b:{w1}s}  ",
                                 subsequent_indent=indent)
            head.append(text)
        return "\n".join(head)


def _show(value: Any) -> str:
    """A default as ``-o`` would take it."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else f"{value}"


def kaiming_(t: Tensor) -> Tensor:
    """LoRA's A init: kaiming-uniform with a = √5, as ``nn.Linear`` does."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def orthogonality(a: Tensor, b: Tensor) -> Tensor:
    """``‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F`` with the r×r Gram matrices."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)
