"""What every adapter method is: an options schema, init from a base weight, forward, regularizer,
a per-step hook, and the exact low-rank ΔW.

One ``Adapter`` instance sits beside one ``nn.Linear`` (weight ``W [m, n] = [out, in]``) and adds
its correction to the base output. The whole design rests on one rule: at every moment the adapted
layer computes ``(W + ΔW) x`` where ``ΔW = B @ A`` is available in low-rank form through
:meth:`Adapter.delta`, against the ORIGINAL ``W``. Methods that "rewrite the base" (PiSSA's residual,
KaSA's truncation) express that rewrite as a frozen low-rank term instead of touching ``W``.

A method's options dataclass is its whole schema: each field's type, default and :func:`opt`
metadata (doc, valid range, whether it weights a regularizer). Parsing ``-o KEY=VALUE``, validation,
``--reg`` and ``svd-serve methods`` are derived from it; a key the dataclass lacks is refused.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import SvdServeError
from ..linalg import LowRank

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "lt": (operator.lt, "<")}


def opt(default: Any, doc: str, *, reg: bool = False, ge: float | None = None, gt: float | None = None,
        lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """One option of a method: its default, what it does, and its valid values (``ge`` ≤ value,
    ``gt`` < value, value < ``lt``; a string option: one of ``choices``). ``reg=True`` marks a
    regularizer weight (``--reg`` takes only these)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "reg": reg, "ge": ge, "gt": gt, "lt": lt,
                                                        "choices": choices})


def rank_opt(default: int = 8) -> Any:
    return opt(default, "Adapter rank r.", ge=1)


def alpha_opt(default: float | None = None) -> Any:
    return opt(default, "LoRA alpha: the update is scaled by alpha / rank.", gt=0)


def niter_opt() -> Any:
    return opt(None, "none: exact SVD; an integer: randomized SVD with that many power iterations (a faster, "
                     "approximate init: see linalg.top_svd).", ge=0)


@dataclass
class Options:
    """Base of every method's options (no fields: a method without options, such as ``svf``).

    Values are checked on construction: type (an int is accepted for a float), finiteness, range."""

    def __post_init__(self) -> None:
        for name, f in self.fields().items():
            value = getattr(self, name)
            kind, optional = self.kind(name)
            if value is None:
                if not optional:
                    raise SvdServeError(f"option {name} needs a value ({kind.__name__})")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SvdServeError(f"option {name} must be {_a(kind)}, not {value!r}")
            if kind is float and not math.isfinite(value):
                raise SvdServeError(f"option {name} must be finite, not {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise SvdServeError(f"option {name} must be one of {', '.join(choices)}, not {value!r}")
            for key, (holds, sign) in _BOUNDS.items():
                bound = f.metadata.get(key)
                if bound is not None and not holds(value, bound):
                    raise SvdServeError(f"option {name} must be {sign} {bound:g}, not {value:g}")

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def kind(cls, name: str) -> tuple[type, bool]:
        """``(bool | int | float | str, whether None is allowed)`` of field ``name``, from its annotation."""
        kind, optional = field_kind(cls, name)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{name}: an option is a bool, int, float or str (or None)")
        return kind, optional

    @classmethod
    def regularizer_weights(cls) -> list[str]:
        return [name for name, f in cls.fields().items() if f.metadata.get("reg")]

    @classmethod
    def parse(cls, name: str, raw: Any) -> Any:
        """The value of option ``name`` from a command-line string (typed values pass through)."""
        return parse_value(*cls.kind(name), name, raw)

    @classmethod
    def from_dict(cls, values: dict, method: str) -> "Options":
        """The options from ``values`` (strings are parsed); a key the method does not have is refused."""
        fields = cls.fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            has = f"its options: {', '.join(fields)}" if fields else "it has none"
            raise SvdServeError(f"method {method} has no option {', '.join(unknown)} ({has}; see "
                                f"`svd-serve methods {method}`)")
        try:
            return cls(**{k: cls.parse(k, v) for k, v in values.items()})
        except SvdServeError as e:
            raise SvdServeError(f"{method}: {e}") from None


def field_kind(cls: type, name: str) -> tuple[type | None, bool]:
    """``(bool | int | float | str, or None for any other type; whether None is allowed)`` of a
    dataclass field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    kind = kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else None
    return kind, len(kinds) < len(args)


def parse_value(kind: type, optional: bool, name: str, raw: Any) -> Any:
    """``raw`` as a ``kind`` if it is a string (``none`` → None where allowed); other values, and
    strings for a ``str`` field, pass through."""
    if not isinstance(raw, str) or kind is str:
        return raw
    text = raw.strip().lower()
    if optional and text == "none":
        return None
    if kind is bool:
        if text not in _TRUE + _FALSE:
            raise SvdServeError(f"option {name} is true or false, not {raw!r}")
        return text in _TRUE
    try:
        return kind(raw)
    except ValueError:
        raise SvdServeError(f"option {name} must be {_a(kind)}, not {raw!r}") from None


def _a(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


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
    bound: ClassVar[str] = "2r"  # the rank bound of ΔW as text, for `svd-serve methods` (rank_bound computes it)
    Options: ClassVar[type[Options]] = LoRAOptions
    alpha_per_rank: ClassVar[float] = 2.0
    needs_calibration: ClassVar[bool] = False

    def __init__(self, out_features: int, in_features: int, opts: Options):
        super().__init__()
        self.m, self.n, self.opts = out_features, in_features, opts
        self.k = min(out_features, in_features)
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
    def init(self, weight: Tensor, cov: Tensor | None = None) -> None:
        """Set every tensor from the base weight (float32 ``[m, n]``) and, if needed, the
        calibration input covariance ``cov [n, n]`` (float64)."""
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
        """Largest possible rank of ΔW."""
        return 2 * self.opts.rank

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called by the training loop for every layer after each optimizer step (``step`` updates
        done of ``total_steps``), gradients still in place. No-op by default; a method that prunes or
        re-factors its parameters does it here. State it keeps must live in parameters or buffers
        (so checkpoints and resume carry it), and it must not change :meth:`frozen_factors` (the run
        may have added them to its copy of the base weights)."""

    @classmethod
    def needs_calibration_for(cls, opts) -> bool:
        """Whether :meth:`init` needs the calibration covariance with these options."""
        return cls.needs_calibration

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
                f"    ΔW rank ≤ {cls.bound}" + ("; needs --calib-data" if cls.needs_calibration else "")]
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
