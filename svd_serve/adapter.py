"""A set of method adapters over a model's target modules, and the native adapter format.

Native format (a directory; names chosen so that no tool mistakes it for a PEFT adapter):

- ``svd_adapter.json``: format version, svd-serve version, method, options, targets and their
  shapes, architecture, base fingerprint;
- ``svd_adapter.safetensors``: every tensor of every layer, ``<module>.<tensor>`` — trainable ones and
  the frozen factors exact export needs (KaSA's dropped components, residual methods' A0/B0, ...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .calib import TruncationWeights, lower_rank
from .errors import SvdServeError
from .files import atomic_dir, check_finite
from .linalg import Compressed, LowRank, add_low_rank_
from .methods import Adapter, Options, get_method
from .methods.delta import Delta
from .model import AdaptedLinear, attach, detach, fingerprint

CONFIG_NAME = "svd_adapter.json"
WEIGHTS_NAME = "svd_adapter.safetensors"
FORMAT = "svd-serve-adapter"
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    method: str
    options: dict
    targets: dict[str, list[int]]  # module name -> [out, in]
    target_spec: str
    architecture: str
    base_fingerprint: str
    base_model: str = ""  # the base as given: a directory or a Hugging Face Hub id
    base_revision: str | None = None  # a Hub id's revision as given (None: its default branch)
    base_commit: str | None = None  # a Hub id's snapshot commit the adapter was made on
    dtype: str = "float32"
    svd_serve_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


def make_options(method: str, rank: int | None = None, alpha: float | None = None, **values) -> Options:
    """The method's options dataclass from typed values or ``-o`` strings (None: the method's default).
    A value the method has no option for (``alpha`` for ``svf``, ``beta`` for ``lora``) is refused."""
    given = {k: v for k, v in {"rank": rank, "alpha": alpha, **values}.items() if v is not None}
    return get_method(method).Options.from_dict(given, method)


def sweep_options(method: str, **values) -> Options:
    """:func:`make_options` with only those of ``values`` the method has: one setting for every
    method of a sweep (``rank=8`` for all; ``svf`` has no rank, ``sorsa`` no alpha)."""
    fields = get_method(method).Options.fields()
    return make_options(method, **{k: v for k, v in values.items() if k in fields})


def parse_option_values(method: str, pairs: list[str] | dict) -> dict:
    """``["beta=1e-3", "freeze_a=true"]`` (or a mapping) → a mapping of typed values, each parsed by its
    field's type in the method's options dataclass (a key it lacks is kept, for
    :func:`make_options` to refuse)."""
    fields = get_method(method).Options.fields()
    items = pairs.items() if isinstance(pairs, dict) else [_key_value(p, method) for p in pairs]
    out = {}
    for key, raw in items:
        key = key.strip().replace("-", "_")
        if key in out:
            raise SvdServeError(f"option {key} of {method} is given twice")
        out[key] = get_method(method).Options.parse(key, raw) if key in fields else raw
    return out


def _key_value(pair: str, method: str) -> tuple[str, str]:
    key, sep, raw = pair.partition("=")
    if not sep:
        raise SvdServeError(f"bad option {pair!r} for {method}: expected KEY=VALUE")
    return key, raw


class AdapterSet(nn.Module):
    """One method adapter per target module. ``attach`` wraps the modules of a model with them."""

    def __init__(self, config: AdapterConfig, method: type[Adapter] | None = None):
        """``method``: the layers' class (default: the registered method ``config.method``); a class
        outside the registry, such as the trainable combination of a merge, is passed here."""
        super().__init__()
        self.config = config
        cls = method or get_method(config.method)
        options = dict(config.options)
        for key in ("rank", "alpha"):  # files of svd-serve 0.1 held both for every method, used or not
            if key not in cls.Options.fields():
                options.pop(key, None)
        opts = cls.Options.from_dict(options, config.method)
        self.method: type[Adapter] = cls
        self.layers = nn.ModuleDict()
        for name, (m, n) in config.targets.items():
            try:
                self.layers[_key(name)] = cls(m, n, opts)
            except SvdServeError as e:
                raise SvdServeError(f"{e} (module {name})") from None

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, model: nn.Module, method: str, opts, targets: list[str], target_spec: str = "",
               statistics: dict[str, Tensor] | None = None, base_model: str = "",
               progress: bool = True, source=None) -> "AdapterSet":
        """A fresh adapter on ``targets`` of ``model``; ``statistics``: each module's calibration
        statistic, the one the method declares (``Adapter.statistic``, :func:`svd_serve.calib.calibrate`).
        ``source``: a :class:`svd_serve.weights.Weights` of the base's files, whose full-precision weights
        the init and the fingerprint read instead of ``model``'s (a quantized model's)."""
        method_cls = get_method(method)
        if method_cls.needs_calibration_for(opts) and not statistics:
            raise SvdServeError(f"method {method} needs calibration data (--calib-data)")
        shapes = {n: list((source or model).get_submodule(n).weight.shape) for n in targets}
        config = AdapterConfig(
            method=method, options=dataclasses.asdict(opts), targets=shapes, target_spec=target_spec,
            architecture=type(model).__name__,
            base_fingerprint=source.fingerprint(targets) if source is not None else fingerprint(model, targets),
            base_model=base_model)
        self = cls(config)
        names = tqdm(targets, desc=f"init {method}", disable=not progress or len(targets) < 8,
                     leave=False)
        for name in names:
            weight = (source.weight(name) if source is not None else model.get_submodule(name).weight).detach().float()
            stat = statistics.get(name) if statistics else None
            self.layers[_key(name)].init(weight, stat)
        return self

    @classmethod
    def fresh(cls, model: nn.Module, method: str, opts, targets: list[str], target_spec: str = "",
              calibration: Callable[[str], dict[str, Tensor]] | None = None, base_model: str = "",
              progress: bool = True, source=None) -> "AdapterSet":
        """:meth:`create`, calibrated where the method uses a statistic with these options
        (``uses_calibration_for``): ``calibration(statistic)`` gives each module's statistic (the one
        the method declares, ``Adapter.statistic``). Without ``calibration``, a method that needs one
        is refused by :meth:`create`. ``source``: see :meth:`create`."""
        method_cls = get_method(method)
        stats = calibration(method_cls.statistic) if (
            calibration is not None and method_cls.uses_calibration_for(opts)) else None
        return cls.create(model, method, opts, targets, target_spec, stats, base_model, progress, source)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "AdapterSet":
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            hint = " (it looks like a PEFT adapter: use `svd-serve import`)" if (
                path / "adapter_config.json").is_file() else ""
            raise SvdServeError(f"{path} is not an svd-serve adapter: no {CONFIG_NAME}{hint}")
        try:
            raw = json.loads(cfg_file.read_bytes())
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            config = AdapterConfig(**raw)
            for key, kind in (("method", str), ("options", dict), ("targets", dict)):
                if not isinstance(getattr(config, key), kind):
                    raise TypeError(f"{key} is a {type(getattr(config, key)).__name__}")
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise SvdServeError(f"{cfg_file} is corrupt: {e}") from None
        if config.format != FORMAT or config.format_version > FORMAT_VERSION:
            raise SvdServeError(f"{cfg_file}: unsupported format {config.format} v{config.format_version}")
        self = cls(config)
        try:
            tensors = load_file(path / WEIGHTS_NAME)
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise SvdServeError(f"cannot read {path / WEIGHTS_NAME}: {str(e).splitlines()[0]}") from None
        check_finite(tensors.items(), f"the adapter {path} is corrupt")
        state = {_key(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
        try:
            self.layers.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise SvdServeError(f"{path}: tensors do not match its config: {str(e).splitlines()[0]}") from None
        if model is not None:
            self.check_base(model)
        return self

    def check_base(self, model) -> None:
        """Shapes and fingerprint of the targets against ``model``: a loaded base, or a
        :class:`svd_serve.weights.Weights` (its skeleton's shapes, its files' samples)."""
        modules = dict(model.named_modules())
        for name, shape in self.config.targets.items():
            mod = modules.get(name)
            if mod is None:
                raise SvdServeError(f"adapter module {name} does not exist in this base model")
            if list(mod.weight.shape) != list(shape):
                raise SvdServeError(f"adapter module {name} has shape {shape}, the base has "
                                    f"{list(mod.weight.shape)}: the adapter belongs to another base")
        names = list(self.config.targets)
        fp = fingerprint(model, names) if isinstance(model, nn.Module) else model.fingerprint(names)
        if fp != self.config.base_fingerprint:
            quantized = getattr(model, "quantization", None) or getattr(model, "svd_serve_quantization", None)
            why = ""
            if quantized is not None:  # (a Weights, or a model load_base dequantized)
                why = (f"; this base is a {quantized.describe()} quantization: an adapter trained on the "
                       "full-precision base must be exported against that base (--base), with this one as "
                       "--served-base to write it for this quantized copy")
            raise SvdServeError(f"the adapter was initialised from a different base (fingerprint "
                                f"{self.config.base_fingerprint} != {fp} of this base){why}")

    # --- use ---------------------------------------------------------------------------------------
    def items(self):
        for key, layer in self.layers.items():
            yield _name(key), layer

    def attach(self, model: nn.Module) -> nn.Module:
        attach(model, dict(self.items()))
        return model

    @staticmethod
    def detach(model: nn.Module) -> nn.Module:
        detach(model)
        return model

    def regularizer(self) -> Tensor | None:
        """Mean over layers of each layer's weighted regularizer (None if the method has none)."""
        terms = [r for _, layer in self.items() if (r := layer.regularizer()) is not None]
        return torch.stack(terms).mean() if terms else None

    def after_step(self, step: int, total_steps: int) -> None:
        """The method's :meth:`Adapter.after_step_all` hook over every layer (by default each layer's
        :meth:`Adapter.after_step`); the training loop calls it after each update."""
        self.method.after_step_all(dict(self.items()), step, total_steps)

    def pop_stale(self) -> list[nn.Parameter]:
        """Parameters whose optimizer state a layer's hook asked to drop (:meth:`Adapter.reset_optimizer_state`)."""
        return [p for _, layer in self.items() for p in layer.pop_stale()]

    def deltas(self, max_rank: int | None = None, weights: TruncationWeights | None = None) -> dict[str, Compressed]:
        """Each module's ΔW against the original base in its smallest exact rank, or the best rank
        ``max_rank`` approximation: plain (Frobenius), or in the norm ``weights`` choose with the output
        error on their calibration data (:class:`svd_serve.calib.TruncationWeights`)."""
        return {name: lower_rank(weights, name, layer.delta(), max_rank) for name, layer in self.items()}

    @torch.no_grad()
    def fold_into(self, model: nn.Module) -> None:
        """``W ← W + ΔW`` in the weight's dtype (computed in float32)."""
        for name, layer in self.items():
            mod = model.get_submodule(name)
            w = (mod.base if isinstance(mod, AdaptedLinear) else mod).weight
            add_low_rank_(w, *layer.delta())

    def save(self, path: str | Path, inputs=(), overwrite: bool = False) -> Path:
        tensors = {f"{name}.{k}": v.detach().float().contiguous().cpu()
                   for name, layer in self.items() for k, v in layer.state_dict().items()}
        check_finite(tensors.items(), f"refusing to write the adapter {path}")
        with atomic_dir(path, inputs, overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        return Path(path)


def delta_adapter(factors: dict[str, LowRank], architecture: str, base_fingerprint: str,
                  base_model: str = "", target_spec: str = "") -> AdapterSet:
    """A native ``delta`` adapter holding ``ΔW = B A`` per module (``factors``: module → ``(A, B)``,
    zero-padded to one rank): what merge, import and extract write."""
    rank = max(1, max(a.shape[0] for a, _ in factors.values()))
    config = AdapterConfig(
        method="delta", options=dataclasses.asdict(Delta.Options(rank=rank)),
        targets={n: [b.shape[0], a.shape[1]] for n, (a, b) in factors.items()},
        target_spec=target_spec or ",".join(sorted({n.rsplit(".", 1)[-1] for n in factors})),
        architecture=architecture, base_fingerprint=base_fingerprint, base_model=str(base_model))
    adapters = AdapterSet(config)
    with torch.no_grad():
        for name, layer in adapters.items():
            a, b = factors[name]
            layer.A.zero_()
            layer.B.zero_()
            layer.A[: a.shape[0]].copy_(a)
            layer.B[:, : b.shape[1]].copy_(b)
    return adapters


def _key(name: str) -> str:
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")
