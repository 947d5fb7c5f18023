"""``svd-serve fold``: a standalone HF checkpoint equal to base + adapter, in the base's dtype (a
quantized base: its dequantized weights + ΔW, in the ``--dtype`` asked for).

The base is never loaded: each target weight is read, ``W + B A`` computed in float32 and rounded once,
and written; every other tensor is copied as it is (:func:`svd_serve.weights.write_folded`).
"""

from __future__ import annotations

from pathlib import Path

from .adapter import AdapterSet
from .hub import resolve
from .weights import Weights, folded_dtype, parse_size, return_freed_memory, write_folded
from .files import atomic_dir, check_out


def fold(base: str | Path, adapter: str | Path, out: str | Path, max_shard_size: int | str | None = None,
         overwrite: bool = False, dtype: str | None = None, revision: str | None = None) -> Path:
    """``dtype`` (float16/bfloat16/float32): for a quantized base, the dtype of the dequantized
    weights written (required there, refused for a full-precision base). ``base``: a local directory
    or a Hugging Face Hub id at ``revision`` (:mod:`svd_serve.hub`)."""
    max_shard_size = parse_size(max_shard_size)
    base = resolve(base, revision).path
    check_out(out, [base, adapter], overwrite)
    return_freed_memory()
    ckpt = Weights(base)
    dtype = folded_dtype(ckpt, dtype)
    adapters = AdapterSet.load(adapter, ckpt)
    layers = dict(adapters.items())
    with atomic_dir(out, [base, adapter], overwrite) as tmp:
        write_folded(ckpt, tmp, list(layers), lambda name: layers[name].delta(), max_shard_size, dtype=dtype)
    return Path(out)
