"""The initialisation health check of ``svd-serve train``: does the adapter at init keep the base intact?

Most methods start exactly at the base: LoRA and SVF-style methods with ``ΔW_init = 0``, PiSSA, MiLoRA,
OLoRA, CorDA, KORE and SoMA with a residual whose frozen and trainable terms cancel to float32
round-off. KaSA does not: it drops the r minor singular components of each target, which assumes they
carry nothing. Where they do (a flat spectrum, as in SmolLM2's ``v_proj``), training starts from a
broken model and nothing would say so.

Before step 1, :func:`check_init` measures on a few rows (the eval rows if any, else training rows),
with the model exactly as the loop trains it (absorbed frozen terms, dtype, autocast, device):

- the loss of the adapted model at init, and the base's loss: the same forward with every adapted
  module's ``ΔW_init x`` subtracted from its output (float32 round-off away from the base);
- per target module, the relative output change ``‖ΔW_init x‖ / ‖W x‖`` over the base's real
  activations at that module (Frobenius norms over all non-padding tokens of the rows).

It prints a short table (module types, worst first), returns a :class:`Health` whose :meth:`~Health.record`
goes to ``metrics.jsonl`` as step 0, and refuses (:class:`SvdServeError`) when the init raises the loss
by more than the limit. Cost: two forward passes over at most :data:`ROWS` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dataset import Example, collate
from ..errors import SvdServeError

ROWS = 16  # rows the check runs on
DEFAULT_LIMIT = 0.05  # nats of mean cross-entropy per target token
OFF = ("off", "none", "inf", "false", "no")


def parse_limit(value) -> float | None:
    """``--max-init-loss-increase``: the largest loss increase at init, in nats, that training accepts.
    ``0``, ``inf`` and ``off`` (YAML's ``off``/``false`` and ``None`` too) turn the refusal off; the
    check still runs and is recorded. Returns the limit, or None for off."""
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SvdServeError(f"--max-init-loss-increase must be a number of nats, 0, inf or off, not {value!r}")
    if isinstance(value, str):
        if value.strip().lower() in OFF:
            return None
        try:
            value = float(value)
        except ValueError:
            raise SvdServeError(f"--max-init-loss-increase must be a number of nats, 0, inf or off, "
                                f"not {value!r}") from None
    value = float(value)
    if math.isnan(value) or value < 0:
        raise SvdServeError(f"--max-init-loss-increase must be >= 0 (0, inf or off: never refuse), not {value}")
    return None if value == 0 or math.isinf(value) else value


@dataclass
class Health:
    """What :func:`check_init` measured."""

    method: str
    base_loss: float  # mean cross-entropy per target token
    init_loss: float
    rows: int
    tokens: int  # non-padding tokens the module statistics cover
    modules: dict[str, float]  # module -> ‖ΔW_init x‖ / ‖W x‖
    limit: float | None
    quantized: str | None = None  # the base's quantization (--quantize), if any: its loss is the quantized base's

    @property
    def increase(self) -> float:
        return self.init_loss - self.base_loss

    @property
    def refused(self) -> bool:
        return self.limit is not None and not self.increase <= self.limit  # (a NaN loss is refused)

    def by_type(self) -> list[tuple[str, int, float, float, str]]:
        """``(type, modules, mean change, max change, worst module)`` per module type (the last part of
        the name, e.g. ``v_proj``), the largest max change first."""
        groups: dict[str, list[tuple[float, str]]] = {}
        for name, change in self.modules.items():
            groups.setdefault(name.rsplit(".", 1)[-1], []).append((change, name))
        rows = [(kind, len(v), sum(c for c, _ in v) / len(v), *max(v)) for kind, v in groups.items()]
        return sorted(rows, key=lambda r: (-r[3], r[0]))

    def table(self) -> str:
        limit = "off" if self.limit is None else f"{self.limit:g}"
        base = f"{self.quantized} base" if self.quantized else "base"
        lines = [f"init check on {self.rows} rows ({self.tokens} tokens): loss {self.base_loss:.4f} ({base}) -> "
                 f"{self.init_loss:.4f} (init), {self.increase:+.4f} nats (limit {limit})",
                 f"  {'module type':14s} {'n':>4s}  {'‖ΔW x‖/‖W x‖ mean':>18s} {'max':>9s}  worst module"]
        for kind, n, mean, worst, name in self.by_type():
            lines.append(f"  {kind:14s} {n:4d}  {_fmt(mean):>18s} {_fmt(worst):>9s}  {name}")
        return "\n".join(lines)

    def record(self) -> dict:
        """The ``metrics.jsonl`` record (step 0)."""
        return {"step": 0, "init_check": {
            "base_loss": self.base_loss, "init_loss": self.init_loss, "increase": self.increase,
            "limit": self.limit, "rows": self.rows, "tokens": self.tokens, "modules": self.modules,
            **({"quantized": self.quantized} if self.quantized else {})}}

    def error(self, options: dict) -> str:
        worst = ", ".join(f"{kind} ({_fmt(w)} of its output)" for kind, _, _, w, _ in self.by_type()[:2])
        remedy = []
        if options.get("select") == "weight":  # a method that picks minor components by singular value
            remedy.append("-o select=activation --calib-data FILE (components chosen by output energy)")
        remedy += ["a method whose init is exact (lora, pissa, milora, corda-kpa, ...)", "fewer --targets",
                   "or --max-init-loss-increase off to train from it anyway"]
        return (f"the {self.method} init raises the loss on {self.rows} rows from {self.base_loss:.4f} to "
                f"{self.init_loss:.4f} ({self.increase:+.4f} nats, limit {self.limit:g}): it changes the output "
                f"of {worst}; use {', '.join(remedy)}")


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1%}" if x >= 1e-3 else f"{x:.1e}"


def check_init(model: nn.Module, adapters, examples: list[Example], pad_id: int,
               loss_sum: Callable[[dict], tuple[Tensor, Tensor]], batch_size: int, limit: float | None,
               say: Callable[[str], None] = print, rows: int = ROWS, quantized: str | None = None) -> Health:
    """Measure the init (see the module docstring), print the table with ``say``, and raise
    :class:`SvdServeError` when the loss increase exceeds ``limit`` (None: never).

    ``model`` is the model as trained, with ``adapters`` attached (its target modules wrapped, any way
    whose output is ``(W + ΔW) x + b``); ``loss_sum(batch)`` is the loop's ``(Σ cross-entropy, target
    tokens)`` of a :func:`~svd_serve.dataset.collate` batch. Every rank of a multi-process run computes the
    same result, so all of them refuse together. ``rows``: how many examples, spread over the list;
    ``quantized``: the base's quantization (the report says the base loss is the quantized base's)."""
    limit = parse_limit(limit)
    rows = examples[::max(1, len(examples) // rows)][:rows]
    batches = [collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            init_loss = _mean_loss(loss_sum, batches)
            with _base_outputs(model, adapters) as (stats, mask):
                base_loss = _mean_loss(loss_sum, batches, mask)
    finally:
        model.train(was_training)
    modules = {name: math.sqrt(d / w) if w > 0 else (0.0 if d == 0 else math.inf)
               for name, (d, w) in stats.items()}
    health = Health(adapters.config.method, base_loss, init_loss, len(rows),
                    int(sum(int(b["attention_mask"].sum()) for b in batches)), modules, limit, quantized)
    say(health.table())
    if health.refused:
        raise SvdServeError(health.error(adapters.config.options))
    return health


def _mean_loss(loss_sum, batches, mask: list | None = None) -> float:
    ce, n = 0.0, 0
    for batch in batches:
        if mask is not None:
            mask[:] = [batch["attention_mask"].bool()]
        total, count = loss_sum(batch)
        ce, n = ce + float(total), n + int(count)
    return ce / max(n, 1)


@contextmanager
def _base_outputs(model: nn.Module, adapters):
    """While active, every adapted module outputs ``y − ΔW_init x``: the base's output. Yields the
    per-module sums ``[Σ‖ΔW x‖², Σ‖y − b − ΔW x‖²]`` over non-padding tokens, and a one-item list the
    caller sets to the current batch's attention mask."""
    stats: dict[str, list[float]] = {}
    mask: list[Tensor] = []
    handles = []

    def hook(name: str, delta, linear: nn.Module):
        def fn(module, args, out):
            x = args[0]
            with torch.autocast(x.device.type, enabled=False):  # float32 whatever the run's autocast
                d = delta.apply(x.float())
                wx = out.float() - d
                base = wx.to(out.dtype)
                bias = linear.bias  # (read in the forward: a sharded base's is gathered only there)
                if bias is not None:
                    wx = wx - bias.float()
                keep = mask[0].to(x.device) if mask and mask[0].shape == x.shape[:-1] else None
                if keep is not None:
                    d, wx = d[keep], wx[keep]
                s = stats.setdefault(name, [0.0, 0.0])
                s[0] += float(d.double().square().sum())
                s[1] += float(wx.double().square().sum())
            return base
        return fn

    try:
        for name, layer in adapters.items():
            module = model.get_submodule(name)
            base = getattr(module, "base", module)
            delta = layer.delta()
            delta = type(delta)(delta.A.to(base.weight.device), delta.B.to(base.weight.device))
            handles.append(module.register_forward_hook(hook(name, delta, base)))
        yield stats, mask
    finally:
        for h in handles:
            h.remove()
