"""Training on a quantized base (QLoRA): ``svd-serve train --quantize nf4|fp4|int8``.

The frozen base Linear layers (all but the output head) are bitsandbytes' ``Linear4bit`` (NF4 or FP4,
blocks of 64, compute dtype = the run's ``--dtype``) or ``Linear8bitLt`` (LLM.int8(), outlier
threshold 6; on the CPU computed as the dequantized weight times the input, as bitsandbytes trains it), built one weight at a time as the checkpoint is read (:func:`load_quantized`): a
weight is read in full precision into memory of its own, quantized, and dropped, so the process never
holds the full-precision model (nor a memory map of its files). Embeddings and norms are kept in the
compute dtype.

What stays exact:

- the adapter's init (PiSSA's principal factors, KaSA's truncation, CorDA's ...) is computed from the
  ORIGINAL full-precision weights, read again tensor by tensor (:class:`svd_serve.weights.Weights`),
  and its fingerprint is the original base's: every export and verify path serves ``W + ΔW`` with the
  original ``W`` and the exact ``ΔW = B A``, as after a full-precision run;
- the frozen low-rank terms stay separate low-rank products (a 4-bit weight cannot absorb them):
  the model trained is ``Q(W) x + ΔW x``, the quantized base plus the exact adapter.

A method whose ΔW is full-rank (OSFT, SST) holds full-size factors of every target, as much memory as
the full-precision weights: with ``--quantize`` it would save nothing, and is refused.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import SvdServeError
from ..model import parameters_on_meta
from ..weights import Weights

QUANTIZE = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # values per 4-bit absmax block (bitsandbytes' and transformers' default)
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (transformers' default)


def bitsandbytes():
    """The bitsandbytes module, imported without its notice about the optional ``kernels`` package:
    that package only provides a bfloat16 inference kernel of the packed CPU layout, which
    :func:`load_quantized` turns off (it would change a float32 run's evaluation numerics), and
    training never uses; svd-serve -v shows the notice."""
    from ..log import verbose

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    if not verbose():
        logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise SvdServeError(f"--quantize needs the bitsandbytes package (pip install bitsandbytes): {e}") from None
    finally:
        logger.setLevel(level)
    return bnb


def check_quantize(cfg, method, base: Path) -> None:
    """Refuse ``--quantize`` where it cannot work, before any work: bitsandbytes missing, a base
    (``base``: its checked directory) that is already quantized, a method (``method``: its class) with
    full-rank factors, FSDP."""
    if not cfg.quantize:
        return
    if getattr(cfg, "fsdp", False):
        raise SvdServeError("--quantize and --fsdp do not go together (a quantized base is not sharded): "
                            "give one of them")
    config = json.loads((Path(base) / "config.json").read_bytes())
    if isinstance(config.get("quantization_config"), dict):
        how = config["quantization_config"].get("quant_method", "quantized")
        raise SvdServeError(f"--quantize {cfg.quantize}: {cfg.base} is already quantized ({how}); "
                            "--quantize needs a full-precision base")
    if method.full_rank:
        raise SvdServeError(f"--quantize: {method.name} trains full-rank factors of every target (as much "
                            "memory as the full-precision weights, so quantizing the base saves nothing); "
                            "train it without --quantize")
    bitsandbytes()


@functools.cache
def _int8_linear(bnb) -> type:
    class Int8Linear(bnb.nn.Linear8bitLt):
        """LLM.int8() weights computed on the CPU as bitsandbytes trains them there (the dequantized
        weight times the input) in evaluation too, where its inference path would round the inputs
        to int8 through float16: the health check, evaluation and training see one model."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            mode, self.training = self.training, True
            try:
                return super().forward(x)
            finally:
                self.training = mode

    return Int8Linear


def _quantized_linear(bnb, linear: nn.Linear, weight: torch.Tensor, quant: str, dtype: torch.dtype) -> nn.Module:
    """``linear`` (a meta module) as a bitsandbytes layer holding ``weight`` quantized (on the CPU)."""
    bias = linear.bias is not None
    with parameters_on_meta():
        if quant == "int8":
            layer = _int8_linear(bnb)(linear.in_features, linear.out_features, bias=bias,
                                        has_fp16_weights=False, threshold=INT8_THRESHOLD)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                      quant_type=quant)
    if quant == "int8":
        layer.weight = bnb.nn.Int8Params(weight.to(dtype), requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type=quant,
                                         blocksize=BLOCKSIZE, compress_statistics=False, module=layer)
        # the packed CPU layout computes in bfloat16 without autograd: evaluation in a float32 run would
        # round differently from training (and a forward in no_grad would leave the weight repacked)
        layer.support_avx512bf16_for_cpu = False
    layer.weight = layer.weight.to("cpu")  # quantizes
    return layer


def load_quantized(path: str | Path, quant: str, dtype: torch.dtype) -> nn.Module:
    """The causal LM at ``path`` with every Linear but the output head quantized (``quant``: nf4, fp4
    or int8; ``dtype``: the compute dtype, also that of the other parameters), read one tensor at a time."""
    if quant not in QUANTIZE:
        raise SvdServeError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quant!r}")
    bnb = bitsandbytes()
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..model import set_module

    path = Path(path)
    ckpt = Weights(path)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError) as e:
        raise SvdServeError(f"cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    with parameters_on_meta():
        model = cls(config)
    head = model.get_output_embeddings()
    tied = set()
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        tied = {n for n, m in model.named_modules() if m is head}

    def read(name: str) -> torch.Tensor:
        if name not in ckpt:
            raise SvdServeError(f"--quantize: {path} has no tensor {name} (this architecture's checkpoint names "
                                "differ from its modules'; train it without --quantize)")
        return ckpt.read(name)

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                layer = _quantized_linear(bnb, module, read(f"{name}.weight"), quant, dtype)
                if module.bias is not None:
                    layer.bias = nn.Parameter(read(f"{name}.bias").to(dtype), requires_grad=False)
                set_module(model, name, layer)
        for module_name, module in model.named_modules():
            if module_name in tied:
                continue
            for key, param in list(module._parameters.items()):
                if param is not None and param.device.type == "meta":
                    value = read(f"{module_name}.{key}" if module_name else key)
                    module._parameters[key] = nn.Parameter(value.to(dtype) if value.is_floating_point() else value,
                                                           requires_grad=False)
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise SvdServeError(f"--quantize: {path} has no tensor {left[0]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized Linear."""
    bnb = bitsandbytes()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes Linear computes with: its quantized values dequantized."""
    bnb = bitsandbytes()
    w = module.weight
    if hasattr(w, "quant_state"):  # Params4bit
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return w.data.float().mul_(scb.float().unsqueeze(1).mul(1.0 / 127.0))  # (as bitsandbytes computes it)
