"""Quantized bases: recognising a quantized checkpoint, dequantizing one module at a time, and
writing quantized copies of a full-precision checkpoint (for tests and benchmarks).

A quantized base is read through :class:`svd_serve.weights.Weights` like any other: the
``quantization_config`` of its ``config.json`` names the format, :func:`detect` turns it into a
:class:`Quantization`, and ``Weights.weight(module)`` returns the module's *dequantized* float weight
(in the config's dtype), read from that module's own tensors only. Adapters are then trained,
exported and folded against those dequantized weights: ``W_deq + ΔW`` is what a server running the
quantized base computes, up to its kernels' rounding.

Formats and who dequantizes them:

- ``compressed-tensors`` (``pack-quantized`` int weights W4A16/W8A16, ``int-quantized`` W8A8,
  ``float-quantized`` FP8, ``naive-quantized``): the library's own compressor ``decompress``
  (``pack-quantized``: its int32 words unpacked here, then the library's ``dequantize``).
- ``bitsandbytes`` 4-bit (nf4/fp4, as transformers serializes a ``load_in_4bit`` model: packed
  ``weight`` plus ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__*``
  and the nested statistics of double quantization): ``bitsandbytes.functional.dequantize_4bit``;
  8-bit (``weight`` int8 plus ``SCB``): ``int8_vectorwise_dequant``.
- ``gptq`` (``qweight`` int32 packed along in-features, ``qzeros`` packed along out-features,
  ``scales``, ``g_idx``; version-1 checkpoints store each zero point minus one) and ``awq`` (GEMM:
  ``qweight`` and ``qzeros`` packed along out-features in AWQ's ``[0, 2, 4, 6, 1, 3, 5, 7]``
  order): unpacked here, as vLLM and transformers read those layouts.

:func:`quantize_checkpoint` writes W4A16/W8A16/W8A8/FP8 with compressed-tensors' own quantize and
compress, nf4/fp4/int8 with bitsandbytes' own quantizers, and GPTQ/AWQ by packing round-to-nearest
values in their layouts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import SvdServeError

if TYPE_CHECKING:
    from .weights import Weights

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_LIBRARIES = {"compressed-tensors": ("compressed_tensors", "compressed-tensors"),
              "bitsandbytes": ("bitsandbytes", "bitsandbytes")}


def require(method: str):
    """The library that reads ``method``'s checkpoints, or an error naming the pip package."""
    import importlib

    module, package = _LIBRARIES[method]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SvdServeError(f"this base is a {method} quantization, which needs the {package} package: "
                            f"pip install {package}") from None


@dataclass(frozen=True)
class Quantization:
    """What a quantized checkpoint is: ``method`` (its ``quant_method``), ``format`` (the layout:
    ``pack-quantized``, ``int-quantized``, ``float-quantized``, ``nf4``, ``fp4``, ``int8``, ``gptq``,
    ``awq``), ``bits`` of a weight, ``group`` (values per scale along the input; None: one scale per
    output channel (or per bitsandbytes block)), ``dtype`` (the float dtype the dequantized
    weights take: the config's), and ``modules``: the quantized Linear modules found in the files."""

    method: str
    format: str
    bits: int
    group: int | None
    dtype: torch.dtype
    modules: frozenset[str] = field(default_factory=frozenset, repr=False)
    config: dict = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        """``4-bit compressed-tensors (pack-quantized, group 128)``."""
        detail = self.format if self.format != self.method else ""
        if self.group:
            detail += (", " if detail else "") + f"group {self.group}"
        return f"{self.bits}-bit {self.method}" + (f" ({detail})" if detail else "")

    # --- per module ------------------------------------------------------------------------------
    def tensor_names(self, module: str, names) -> list[str]:
        """The tensors of ``module`` that hold its quantized weight (what a fold drops)."""
        prefix = module + "."  # (a Linear has no submodules: every tensor under it is its own)
        return [n for n in names if n.startswith(prefix) and n != prefix + "bias"]

    def dequantize(self, ckpt: Weights, module: str, shape: tuple[int, int]) -> Tensor:
        """The float weight ``[out, in]`` of ``module`` (in :attr:`dtype`), from its tensors alone."""
        read = {n[len(module) + 1:]: ckpt.read(n) for n in self.tensor_names(module, ckpt.tensors)}
        try:
            w = _DEQUANTIZE[self.method](self, read, shape)
        except SvdServeError:
            raise
        except Exception as e:  # the libraries raise many kinds on tensors that do not fit
            raise SvdServeError(f"{ckpt.path}: cannot dequantize {module} ({self.describe()}): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if tuple(w.shape) != tuple(shape):
            raise SvdServeError(f"{ckpt.path}: {module} dequantizes to shape {list(w.shape)}, its config "
                                f"says {list(shape)}")
        return w.to(self.dtype)


def config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return FLOAT_DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def detect(config: dict, tensor_names) -> Quantization | None:
    """The quantization of a checkpoint from its ``config.json`` (a dict) and tensor names; None when
    it is not quantized. An unknown ``quant_method`` or format is refused, naming it; a known one
    whose library is not installed is refused, naming the package."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise SvdServeError("config.json's quantization_config is not a JSON object")
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    names = list(tensor_names)
    dtype = config_dtype(config)
    if method == "compressed-tensors":
        return _detect_ct(qc, names, dtype)
    if method == "bitsandbytes":
        require("bitsandbytes")
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            fmt = str(qc.get("bnb_4bit_quant_type", "fp4"))
            mods = _marked(names, f".weight.quant_state.bitsandbytes__{fmt}")
            return Quantization(method, fmt, 4, None, dtype, mods, qc)
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return Quantization(method, "int8", 8, None, dtype, _marked(names, ".SCB"), qc)
        raise SvdServeError("bitsandbytes quantization_config loads neither in 4 nor in 8 bits")
    if method in ("gptq", "awq"):
        bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
        if bits not in (2, 4, 8):
            raise SvdServeError(f"{method} with {bits}-bit weights is not supported (2, 4 or 8)")
        if method == "awq" and bits != 4:
            raise SvdServeError(f"awq with {bits}-bit weights is not supported (4)")
        if method == "awq" and not qc.get("zero_point", True):
            raise SvdServeError("awq without zero points is not supported")
        if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
            raise SvdServeError(f"awq version {qc.get('version')!r} is not supported (only gemm)")
        if method == "gptq" and str(qc.get("checkpoint_format", "gptq")) not in ("gptq", "gptq_v2"):
            raise SvdServeError(f"gptq checkpoint_format {qc.get('checkpoint_format')!r} is not supported "
                                "(gptq or gptq_v2)")
        return Quantization(method, method, bits, group if group > 0 else None, dtype, _marked(names, ".qweight"), qc)
    raise SvdServeError(f"the base's quantization_config has quant_method {qc.get('quant_method')!r}, which "
                        "svd-serve cannot read (it reads compressed-tensors, gptq, awq and bitsandbytes)")


def _marked(names: list[str], suffix: str) -> frozenset[str]:
    return frozenset(n[: -len(suffix)] for n in names if n.endswith(suffix))


def _detect_ct(qc: dict, names: list[str], dtype: torch.dtype) -> Quantization:
    require("compressed-tensors")
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
    except Exception as e:  # pydantic.ValidationError
        raise SvdServeError(f"config.json's compressed-tensors quantization_config is invalid: "
                            f"{str(e).splitlines()[0]}") from None
    formats = {(s.format or config.format) for s in config.config_groups.values()}
    known = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
    bad = [f for f in formats if f not in known]
    if bad or not config.config_groups:
        raise SvdServeError(f"compressed-tensors format {bad[0] if bad else None!r} is not supported "
                            f"(svd-serve reads {', '.join(known)})")
    schemes = [s for s in config.config_groups.values() if s.weights is not None]
    if not schemes:
        raise SvdServeError("the compressed-tensors quantization_config quantizes no weights")
    w = schemes[0].weights
    group = w.group_size if w.strategy == "group" else None
    mods = _marked(names, ".weight_packed") | (_marked(names, ".weight_scale") - _marked(names, ".weight_packed"))
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    return Quantization("compressed-tensors", fmt, w.num_bits, group, dtype, mods, qc)


# --- dequantization, one module -------------------------------------------------------------------
@lru_cache(maxsize=8)
def _ct_config(raw: str):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate({k: v for k, v in json.loads(raw).items() if k != "quant_method"})


def _ct_scheme(q: Quantization, read: dict[str, Tensor]):
    """The compressed-tensors scheme (with its format) that wrote these tensors."""
    config = _ct_config(json.dumps(q.config, sort_keys=True))  # (parsed once per checkpoint)
    packed = "weight_packed" in read
    for scheme in config.config_groups.values():
        fmt = scheme.format or config.format
        if scheme.weights is not None and (fmt == "pack-quantized") == packed:
            return scheme.model_copy(update={"format": fmt})
    raise SvdServeError("no compressed-tensors scheme of the config matches the module's tensors")


def _dequantize_ct(q: Quantization, read: dict[str, Tensor], shape) -> Tensor:
    """The library's compressor ``decompress``; for ``pack-quantized``, the int32 words are unpacked
    here (the library's unpacker assigns one strided column at a time, several times slower) and
    dequantized by the library's ``dequantize``, which is all its ``decompress`` does with them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    scheme = _ct_scheme(q, read)
    if scheme.format == "pack-quantized":
        args, (rows, cols) = scheme.weights, (int(n) for n in read["weight_shape"])
        offset = 1 << (args.num_bits - 1)  # (stored unsigned: value + offset)
        x_q = (unpack_int32(read["weight_packed"], args.num_bits, 1)[:, :cols] - offset).to(torch.int8)
        zero = None
        if not args.symmetric and args.strategy in ("group", "channel"):  # zero points packed along rows
            zero = (unpack_int32(read["weight_zero_point"], args.num_bits, 0)[:rows] - offset).to(torch.int8)
        return dequantize(x_q=x_q, scale=read["weight_scale"], zero_point=zero, g_idx=read.get("weight_g_idx"))
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    state = {k: v for k, v in read.items() if k in compressor.compression_param_names(scheme) or k == "weight"}
    if "weight_scale" in state and state["weight_scale"].dtype != q.dtype and state["weight_scale"].is_floating_point():
        state["weight_scale"] = state["weight_scale"].float()
    return compressor.decompress(state, scheme)["weight"]


def _dequantize_bnb(q: Quantization, read: dict[str, Tensor], shape) -> Tensor:
    import bitsandbytes.functional as bnbf

    if q.format == "int8":
        return bnbf.int8_vectorwise_dequant(read["weight"], read["SCB"].float())
    state = bnbf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in read.items() if k != "weight"},
                                      device=torch.device("cpu"))
    return bnbf.dequantize_4bit(read["weight"], state).float().reshape(shape)


def unpack_int32(packed: Tensor, bits: int, dim: int) -> Tensor:
    """The ``bits``-bit unsigned values packed into int32 along ``dim`` (value ``j`` of a word in bits
    ``bits*j``), as int32: the packing of GPTQ's ``qweight`` (dim 0) and ``qzeros`` (dim 1)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    x = packed.to(torch.int32).unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)])
    x = x & ((1 << bits) - 1)
    return x.flatten(dim, dim + 1) if per > 1 else x.squeeze(dim + 1)


def pack_int32(values: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of :func:`unpack_int32`: unsigned ``bits``-bit values packed into int32 along ``dim``."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per) << torch.arange(0, 32, bits, dtype=torch.int64)
    word = v.sum(-1)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # two's complement of the top bit
    return word.to(torch.int32).movedim(-1, dim).contiguous()


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's word: bits 4j hold column AWQ_ORDER[j] of its 8


def _awq_order(bits: int) -> Tensor:
    if bits != 4:
        raise SvdServeError(f"awq with {bits}-bit weights is not supported (4)")
    return torch.tensor(AWQ_ORDER)


def _dequantize_gptq_awq(q: Quantization, read: dict[str, Tensor], shape) -> Tensor:
    out_f, in_f = shape
    bits, per = q.bits, 32 // q.bits
    scales = read["scales"].float()  # [groups, out]
    if q.method == "gptq":
        w = unpack_int32(read["qweight"], bits, 0)[:in_f]  # [in, out]
        zeros = unpack_int32(read["qzeros"], bits, 1)[:, :out_f]  # [groups, out]
        if str(q.config.get("checkpoint_format", "gptq")) == "gptq":
            zeros = (zeros + 1) & ((1 << bits) - 1)  # version 1 stores zero - 1
        g_idx = read.get("g_idx")
        g_idx = (torch.arange(in_f) // (q.group or in_f)) if g_idx is None else g_idx.long()
    else:
        inverse = torch.argsort(_awq_order(bits))
        def unpack(t):
            u = unpack_int32(t, bits, 1)
            return u.reshape(u.shape[0], -1, per)[:, :, inverse].reshape(u.shape[0], -1)
        w, zeros = unpack(read["qweight"])[:, :out_f], unpack(read["qzeros"])[:, :out_f]
        g_idx = torch.arange(in_f) // (q.group or in_f)
    deq = (w.float() - zeros[g_idx].float()) * scales[g_idx]
    return deq.t()


_DEQUANTIZE = {"compressed-tensors": _dequantize_ct, "bitsandbytes": _dequantize_bnb,
               "gptq": _dequantize_gptq_awq, "awq": _dequantize_gptq_awq}


# --- writing quantized copies ----------------------------------------------------------------------
CT_SCHEMES = {"W4A16": "W4A16", "W4A16_ASYM": "W4A16_ASYM", "W8A16": "W8A16", "W8A8": "W8A8", "FP8": "FP8_DYNAMIC"}
BNB_SCHEMES = ("nf4", "fp4", "int8")
_PACKED = re.compile(r"(gptq|awq)-w(4|8)(?:g(\d+))?")
SCHEMES = (*CT_SCHEMES, *BNB_SCHEMES, "gptq-w4g128", "awq-w4g128")


def quantize_checkpoint(src: str | Path, out: str | Path, scheme: str, group_size: int | None = None,
                        overwrite: bool = False) -> Path:
    """Write to ``out`` a quantized copy of the full-precision checkpoint ``src`` in ``scheme``
    (round to nearest, no calibration):

    - ``"W4A16"`` / ``"W8A16"``: int4/int8 symmetric weights, one scale per ``group_size`` inputs,
      compressed-tensors ``pack-quantized`` (what vLLM serves with its WNA16 kernels);
      ``"W4A16_ASYM"``: the same with a zero point per group;
    - ``"W8A8"``: int8 symmetric per-channel weights, dynamic per-token int8 activations,
      compressed-tensors ``int-quantized``; ``"FP8"``: FP8 E4M3 per-channel weights, dynamic
      per-token FP8 activations, ``float-quantized``;
    - ``"nf4"`` / ``"fp4"`` / ``"int8"``: bitsandbytes, serialized as transformers saves a
      ``load_in_4bit`` / ``load_in_8bit`` model (4-bit: blocks of 64, no double quantization);
    - ``"gptq-w4g128"``, ``"awq-w4g128"`` (``-w{4,8}g{group}``, or ``gptq-w4`` with ``group_size``):
      GPTQ (symmetric, version-1 zeros) or AWQ GEMM (asymmetric) layouts.

    Every Linear but the output head is quantized. ``group_size`` (None: 128 when it divides every
    quantized Linear's in-features, else the largest power of two below that does) applies to the
    grouped schemes. Embeddings, norms and the head are copied; config.json carries the
    ``quantization_config`` vLLM and transformers read; tokenizer files are copied."""
    from .files import atomic_dir, check_out
    from .weights import Weights, copy_model_files

    packed = _PACKED.fullmatch(scheme)
    if scheme not in CT_SCHEMES and scheme not in BNB_SCHEMES and not (packed and (packed[1], packed[2]) != ("awq", "8")):
        raise SvdServeError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    check_out(out, [src], overwrite)
    ckpt = Weights(src)
    if ckpt.quantization is not None:
        raise SvdServeError(f"{src} is already quantized ({ckpt.quantization.describe()})")
    config = json.loads((ckpt.path / "config.json").read_text())
    dtype = config_dtype(config)
    head = ckpt.skeleton.get_output_embeddings()
    modules = [n for n, m in ckpt.skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
               and f"{n}.weight" in ckpt]
    if packed and packed[3]:
        group_size = int(packed[3])
    grouped = scheme in ("W4A16", "W4A16_ASYM", "W8A16") or packed
    if grouped:
        group_size = _group_size(ckpt, modules, group_size)
    head_name = next((n for n, m in ckpt.skeleton.named_modules() if m is head), "lm_head")
    if scheme in CT_SCHEMES:
        write, qconfig = _ct_writer(scheme, group_size, head_name)
    elif scheme in BNB_SCHEMES:
        write, qconfig = _bnb_writer(scheme, head_name, dtype)
    else:
        write, qconfig = _packed_writer(packed[1], int(packed[2]), group_size, head_name)
    with atomic_dir(out, [src], overwrite) as tmp:
        tensors: dict[str, Tensor] = {}
        quantized = {f"{m}.weight": m for m in modules}
        for name in ckpt.tensors:
            if name in quantized:
                w = ckpt.read(name).to(dtype)
                for key, t in write(w).items():
                    tensors[f"{quantized[name]}.{key}"] = t.contiguous()
            else:
                tensors[name] = ckpt.read(name)
        _save(tensors, tmp)
        copy_model_files(ckpt.path, tmp)
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)


def _group_size(ckpt, modules: list[str], group_size: int | None) -> int:
    ins = sorted({ckpt.skeleton.get_submodule(m).in_features for m in modules})
    if group_size is None:
        group_size = next((g for g in (128, 64, 32, 16, 8) if all(i % g == 0 for i in ins)), None)
        if group_size is None:
            raise SvdServeError(f"no group size of 8 to 128 divides the in-features {ins}")
    bad = [i for i in ins if i % group_size]
    if group_size < 1 or bad:
        raise SvdServeError(f"group size {group_size} does not divide the in-features {bad or ins} of the "
                            "model's Linear layers: choose one that does")
    return group_size


def _save(tensors: dict[str, Tensor], out: Path, max_shard_size: int = 4 << 30) -> None:
    """Safetensors shards of up to ``max_shard_size`` bytes (with an index when several)."""
    from safetensors.torch import save_file

    from .weights import SAFE_INDEX, shard_by_size

    plan = shard_by_size({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_size)
    for file, names in plan.items():
        save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, names in plan.items() for n in sorted(names)}}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _ct_writer(scheme: str, group_size: int | None, head: str):
    """compressed-tensors: the preset scheme, RTN scales from the library's ``calculate_qparams``,
    then its compressor's ``compress`` (quantize and pack); the config as ``ModelCompressor`` writes it."""
    require("compressed-tensors")
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    qscheme = preset_name_to_scheme(CT_SCHEMES[scheme], ["Linear"])
    if qscheme.weights.strategy == "group":
        qscheme.weights.group_size = group_size
    qscheme.format = infer_module_format(torch.nn.Linear, qscheme)
    compressor = BaseCompressor.get_value_from_registry(qscheme.format)
    args = qscheme.weights

    def write(w: Tensor) -> dict[str, Tensor]:
        view = w.unflatten(1, (-1, args.group_size)) if args.strategy == "group" else w.unsqueeze(1)
        scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
        if args.strategy != "group":
            scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero}
        return dict(compressor.compress(state, qscheme))

    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=[head], format=qscheme.format,
                                quantization_status=QuantizationStatus.COMPRESSED)
    qconfig = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
               "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}
    return write, json.loads(json.dumps(qconfig, default=str))


def _bnb_writer(scheme: str, head: str, dtype: torch.dtype):
    """bitsandbytes' own quantizers; the tensors as transformers' ``Params4bit``/``Int8Params``
    serialize them, the config as ``BitsAndBytesConfig`` writes it."""
    require("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        def write(w: Tensor) -> dict[str, Tensor]:
            q, scb, _ = bnbf.int8_vectorwise_quant(w)
            return {"weight": q, "SCB": scb.float()}

        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[head])
    else:
        def write(w: Tensor) -> dict[str, Tensor]:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=scheme, compress_statistics=False,
                                               quant_storage=torch.uint8)
            return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=False, llm_int8_skip_modules=[head])
    return write, json.loads(config.to_json_string(use_diff=False))


def _packed_writer(method: str, bits: int, group: int, head: str):
    """GPTQ (symmetric: zero ``2**(bits-1)``, stored minus one as version-1 checkpoints do, ``g_idx``
    in order) or AWQ GEMM (asymmetric: scale ``(max-min)/(2**bits-1)``, zero ``round(-min/scale)``)
    round-to-nearest values, packed as those formats pack them."""
    maxq = (1 << bits) - 1

    def write(w: Tensor) -> dict[str, Tensor]:
        out_f, in_f = w.shape
        x = w.float().t().unflatten(0, (-1, group))  # [groups, group, out]
        if method == "gptq":
            amax = x.abs().amax(1).clamp_min(1e-12)
            scale = (2 * amax / maxq).to(w.dtype)
            zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
        else:
            lo, hi = x.amin(1).clamp_max(0), x.amax(1).clamp_min(0)
            scale = ((hi - lo).clamp_min(1e-12) / maxq).to(w.dtype)
            zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.int32)
        q = torch.round(x / scale.float().unsqueeze(1)) + zero.unsqueeze(1)
        q = q.clamp(0, maxq).to(torch.int32).flatten(0, 1)  # [in, out]
        if method == "gptq":
            return {"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32((zero - 1) & maxq, bits, 1),
                    "scales": scale, "g_idx": torch.arange(in_f, dtype=torch.int32) // group}
        order = _awq_order(bits)
        per = 32 // bits

        def pack(t):  # bits per*j hold column order[j] of each run of per columns
            return pack_int32(t.reshape(t.shape[0], -1, per)[:, :, order].reshape(t.shape[0], -1), bits, 1)
        return {"qweight": pack(q), "qzeros": pack(zero), "scales": scale}

    if method == "gptq":
        config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
                  "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                  "checkpoint_format": "gptq", "lm_head": False}
    else:
        config = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True,
                  "version": "gemm", "modules_to_not_convert": [head]}
    return write, config


def load_quantized_state(ckpt: Weights) -> dict[str, Tensor]:
    """Every tensor a float model of ``ckpt`` needs: dequantized weights for the quantized modules,
    the other tensors as stored (what :func:`svd_serve.model.load_base` builds the model from)."""
    q = ckpt.quantization
    state: dict[str, Tensor] = {}
    owned = {n for m in q.modules for n in q.tensor_names(m, ckpt.tensors)}
    for module in sorted(q.modules):
        state[f"{module}.weight"] = ckpt.weight(module)
    for name in ckpt.tensors:
        if name not in owned:
            state[name] = ckpt.read(name)
    return state


def dequantized_tensor_names(ckpt: Weights) -> dict[str, str]:
    """The quantization tensors of ``ckpt`` → the module they belong to."""
    q = ckpt.quantization
    return {n: m for m in q.modules for n in q.tensor_names(m, ckpt.tensors)}

