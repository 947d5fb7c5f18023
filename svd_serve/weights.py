"""Hugging Face checkpoints read and written one tensor at a time, never as a loaded model.

``fold``, ``merge``, ``extract``, ``import``, ``inspect`` and ``export`` need the base one weight at a
time (or only a sample of it), so they never build the model:

- :class:`Weights` reads a model directory: ``model.safetensors``, the shards listed by
  ``model.safetensors.index.json``, or ``pytorch_model*.bin``. Names, shapes and dtypes come from the
  headers. A tensor is read with plain file reads into memory of its own: a memory-mapped file's
  touched pages would count in the process's RSS until it is unmapped (a whole shard, after reading
  every tensor of it through ``safetensors.safe_open``). Fingerprint samples are read through a
  memory map of one tensor at a time, dropped right after.
- :attr:`Weights.skeleton` is the model built on the ``meta`` device from ``config.json``:
  module names, which modules are ``nn.Linear``, tied embeddings and the class name, and no weights.
- :class:`ShardWriter` writes safetensors files whose tensors are known in advance, in any order:
  the headers are written first, every tensor's bytes go to their place as they come, and an
  untouched tensor is copied from the source file by the kernel (``copy_file_range``). Peak memory is
  one target weight in float32 (three of them while ``W + B A`` is computed), whatever the model size.
- :func:`write_folded` is the one fold-and-save: every target weight becomes ``W + B A`` (float32,
  rounded once to the base's dtype, :func:`svd_serve.model.add_low_rank_`), every other tensor
  (tied embeddings included) is copied byte for byte, and the shard layout and index follow the base
  (or ``max_shard_size``).

A ``.bin`` checkpoint is read through ``torch.load(mmap=True)`` one tensor at a time; its output is
always safetensors.

A quantized checkpoint (GPTQ, AWQ, compressed-tensors, bitsandbytes: :mod:`svd_serve.quant`) has
:attr:`Weights.quantization` set; its quantized Linears have a logical :meth:`Weights.weight_info`
(the config's shape and float dtype) and :meth:`Weights.weight` returns the dequantized weight, read
from that module's tensors alone; fingerprints sample it. :func:`write_folded` writes such a base
dequantized, in the dtype the caller names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .errors import SvdServeError
from .files import check_finite
from .linalg import LowRank, add_low_rank_

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def check_base_dir(path: str | Path) -> Path:
    """``path`` if it is a Hugging Face model directory whose config and safetensors headers can be
    read (only the headers: this is cheap at any model size)."""
    path = Path(path)
    if not path.is_dir():
        raise SvdServeError(f"base model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise SvdServeError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SvdServeError(f"{path / 'config.json'} is corrupt: {e}") from None
    if not isinstance(config, dict):
        raise SvdServeError(f"{path / 'config.json'} is corrupt: not a JSON object")
    if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        raise SvdServeError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)
    return path


def check_safetensors(file: Path) -> None:
    """Refuse a safetensors file that is truncated or corrupt, naming it (reads its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError: several types for truncated or corrupt files
        raise SvdServeError(f"cannot read {file}: {str(e).splitlines()[0]} (truncated or corrupt)") from None


FINGERPRINT_SAMPLE = 16384  # values per weight


def fingerprint_stride(numel: int) -> int:
    return max(1, numel // FINGERPRINT_SAMPLE)


def fingerprint_digest(samples: Iterable[tuple[str, tuple[int, ...], Tensor]]) -> str:
    """The digest of ``(name, shape, weight.reshape(-1)[::fingerprint_stride(numel)])`` in name order,
    each sample rounded to bfloat16 (through float32, as a float32-loaded model would be)."""
    h = hashlib.sha256()
    for name, shape, sample in samples:
        h.update(f"{name}:{tuple(shape)}".encode())
        h.update(sample.detach().float().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# the files of a model directory besides its weights: copied to every checkpoint svd-serve writes
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
               "merges.txt", "chat_template.jinja", "chat_template.json")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {  # a safetensors header's dtype code → torch
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOATS = ("F16", "BF16", "F32", "F64")  # dtypes a folded weight may have
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in a safetensors file (-1: a .bin entry)
    nbytes: int
    quantized: bool = False  # the logical float weight of a quantized module (dequantized when read)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict]:
    """A safetensors file's tensors (in data order) and its ``__metadata__``; nothing else is read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 1 << 28):
            raise SvdServeError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SvdServeError(f"{file} is not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SvdServeError(f"{file}: corrupt header entry for {name}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise SvdServeError(f"{file}: tensor {name} has dtype {dtype}, which svd-serve cannot read")
        info = TensorInfo(file, dtype, shape, 8 + n + begin, end - begin)
        if info.nbytes != info.numel * SAFETENSORS_DTYPES[dtype].itemsize or info.offset + info.nbytes > size or begin < 0:
            raise SvdServeError(f"{file} is truncated or corrupt (tensor {name})")
        infos[name] = info
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset)), meta


class Weights:
    """A Hugging Face model directory, read lazily: headers at once, tensors when asked for."""

    def __init__(self, path: str | Path):
        self.path = check_base_dir(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self.is_safetensors = True
        self._weight_map: dict[str, str] = {}
        self._fingerprints: dict[tuple[str, ...], str] = {}
        if (self.path / SAFE_INDEX).is_file() or (self.path / SAFE_NAME).is_file():
            files = self._index_files(SAFE_INDEX, SAFE_NAME)
            for file in files:
                infos, meta = read_header(file)
                self.metadata = self.metadata or meta
                self.tensors.update(infos)
        elif (self.path / BIN_INDEX).is_file() or (self.path / BIN_NAME).is_file():
            self.is_safetensors = False
            for file in self._index_files(BIN_INDEX, BIN_NAME):
                for name, t in self._bin(file).items():
                    self.tensors[name] = TensorInfo(file, DTYPE_CODES[t.dtype], tuple(t.shape), -1,
                                                    t.numel() * t.element_size())
        else:
            raise SvdServeError(f"{self.path} has neither {SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME} nor {BIN_INDEX}")
        self._index_check()
        from .quant import detect

        # None, or how the quantized Linear modules are stored (their weights read dequantized)
        self.quantization = detect(json.loads((self.path / "config.json").read_bytes()), self.tensors)

    def _index_files(self, index_name: str, single: str) -> list[Path]:
        index = self.path / index_name
        if not index.is_file():
            return [self.path / single]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SvdServeError(f"{index} is corrupt: {e}") from None
        self._weight_map = weight_map
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise SvdServeError(f"{index} lists {missing[0]}, which is missing from {self.path}")
        return [self.path / f for f in files]

    def _index_check(self) -> None:
        for name, file in self._weight_map.items():
            if name not in self.tensors or self.tensors[name].file.name != file:
                raise SvdServeError(f"{self.path}: the index puts {name} in {file}, which does not hold it")

    @staticmethod
    def _bin(file: Path) -> dict[str, Tensor]:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds for a bad file
            raise SvdServeError(f"cannot read {file}: {str(e).splitlines()[0]}") from None

    # --- tensors --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (what the checkpoint takes on disk, headers aside)."""
        return sum(i.nbytes for i in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise SvdServeError(f"{self.path} has no tensor {name} (its tensor names do not follow "
                                "the model's module names)")
        return self.tensors[name]

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` in its stored dtype, in memory of its own."""
        info = self.info(name)
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if info.offset < 0:
            return self._finite(name, self._bin(info.file)[name].clone())
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise SvdServeError(f"{info.file} is truncated (tensor {name})")
                done += got
        return self._finite(name, buf.view(dtype).reshape(info.shape))

    def _finite(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor``, read from this checkpoint, refused when it holds NaN or infinity (every tensor
        svd-serve reads is checked; tensors copied through unread are written as they are)."""
        if tensor.is_floating_point() and tensor.element_size() == 1:  # FP8 (of a quantized module): no sum
            tensor = tensor.float()
            check_finite([(name, tensor)], f"the model {self.path} is corrupt")
            return tensor.to(SAFETENSORS_DTYPES[self.info(name).dtype])
        check_finite([(name, tensor)], f"the model {self.path} is corrupt")
        return tensor

    def sample(self, name: str, stride: int) -> Tensor:
        """``tensor.reshape(-1)[::stride]`` (a copy), reading only the pages that hold it."""
        info = self.info(name)
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if info.offset < 0:
            return self._finite(name, self._bin(info.file)[name].reshape(-1)[::stride].clone())
        if info.numel == 0:
            return torch.empty(0, dtype=dtype)
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
        mapped = np.memmap(info.file, dtype=bits, mode="r", offset=info.offset, shape=(info.numel,))
        values = np.array(mapped[::stride])
        del mapped  # unmapped here: its pages leave the process's RSS
        return self._finite(name, torch.from_numpy(values).view(dtype))

    # --- modules --------------------------------------------------------------------------------
    @cached_property
    def config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise SvdServeError(f"cannot read {self.path}/config.json: {str(e).splitlines()[0]}") from None

    @cached_property
    def skeleton(self) -> nn.Module:
        """The causal LM built on the ``meta`` device: structure, shapes and tied weights, no data."""
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config)
        except (OSError, ValueError, KeyError) as e:
            raise SvdServeError(f"cannot build {self.path} as a causal LM: {str(e).splitlines()[0]}") from None
        return model.eval()

    @property
    def architecture(self) -> str:
        return type(self.skeleton).__name__

    def named_modules(self):
        """The skeleton's modules (what :meth:`svd_serve.adapter.AdapterSet.check_base` looks at)."""
        return self.skeleton.named_modules()

    def get_submodule(self, name: str) -> nn.Module:
        return self.skeleton.get_submodule(name)

    def is_quantized(self, module: str) -> bool:
        return self.quantization is not None and module in self.quantization.modules

    def weight_info(self, module: str) -> TensorInfo:
        """The stored weight of the Linear ``module``, checked against the model's shape. For a
        quantized module: its logical weight (the config's shape, the config's float dtype, the file
        of its quantized tensors, ``quantized=True``), as :meth:`weight` returns it."""
        want = tuple(self.skeleton.get_submodule(module).weight.shape)
        if self.is_quantized(module):
            q = self.quantization
            file = self.info(q.tensor_names(module, self.tensors)[0]).file
            numel = int(np.prod(want, dtype=np.int64))
            return TensorInfo(file, DTYPE_CODES[q.dtype], want, -1, numel * q.dtype.itemsize, quantized=True)
        info = self.info(f"{module}.weight")
        if info.shape != want:
            raise SvdServeError(f"{self.path}: {module}.weight has shape {list(info.shape)}, its config "
                                f"says {list(want)}")
        return info

    def weight(self, module: str) -> Tensor:
        """The weight of ``module`` in its stored dtype; a quantized module's weight dequantized (in
        the config's float dtype, from that module's tensors alone: :mod:`svd_serve.quant`)."""
        info = self.weight_info(module)
        if info.quantized:
            return self._finite(f"{module}.weight", self.quantization.dequantize(self, module, info.shape))
        return self.read(f"{module}.weight")

    def fingerprint(self, names: Iterable[str]) -> str:
        """:func:`svd_serve.model.fingerprint` of these modules, reading only its samples (once per
        set of names: several adapters on the same modules read them once)."""
        key = tuple(sorted(names))
        if key not in self._fingerprints:
            def samples():
                for name in key:
                    info = self.weight_info(name)
                    stride = fingerprint_stride(info.numel)
                    if info.quantized:  # (the dequantized weight: a quantized base has its own digest)
                        yield name, info.shape, self.weight(name).reshape(-1)[::stride]
                    else:
                        yield name, info.shape, self.sample(f"{name}.weight", stride)

            self._fingerprints[key] = fingerprint_digest(samples())
        return self._fingerprints[key]


def return_freed_memory() -> None:
    """Have glibc's malloc give buffers of 1 MiB or more back to the system as soon as they are
    freed. By default it raises its mmap threshold to the largest buffer freed so far (up to 32 MiB)
    and serves later buffers of that size from a heap that fragments and keeps growing, so that
    processing one module at a time would still add up over a model. The streaming commands call
    this once; training keeps the default (its buffers are reused, and faster so). No effect
    without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def copy_model_files(src: str | Path, dst: str | Path) -> None:
    """Config, generation config and tokenizer files of a model directory (whichever exist)."""
    for name in MODEL_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)


# --- writing --------------------------------------------------------------------------------------------
def parse_size(size: int | str | None) -> int | None:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes (None stays None)."""
    if size is None:
        return None
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise SvdServeError(f"--max-shard-size {size!r} is not a size such as 5GB or 500MB") from None
    if value < 1:
        raise SvdServeError(f"--max-shard-size {size!r} must be positive")
    return value


def plan_shards(ckpt: Weights, max_shard_size: int | None = None) -> dict[str, list[str]]:
    """Output file → tensor names. Without ``max_shard_size``: the base's own layout (``.bin`` shard
    names become ``.safetensors``); with it: :func:`shard_by_size`."""
    if max_shard_size is not None:
        return shard_by_size({n: i.nbytes for n, i in ckpt.tensors.items()}, max_shard_size)
    plan: dict[str, list[str]] = {}
    for name, info in ckpt.tensors.items():
        file = info.file.name
        if not ckpt.is_safetensors:
            file = SAFE_NAME if file == BIN_NAME else file.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        plan.setdefault(file, []).append(name)
    return plan


def shard_by_size(sizes: dict[str, int], max_shard_size: int) -> dict[str, list[str]]:
    """Tensors (name → bytes, in order) in shards filled up to ``max_shard_size`` bytes (a larger
    tensor gets a shard of its own), named as ``save_pretrained`` names them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        return {SAFE_NAME: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}


class ShardWriter:
    """Safetensors files whose tensors (names, dtypes, shapes) are known before any data: headers
    first, then each tensor at its place in any order (``write``, ``copy``), then ``close`` checks
    that every tensor was written once and writes the index when there are several files."""

    def __init__(self, out: Path, plan: dict[str, list[tuple[str, str, tuple[int, ...]]]], metadata: dict):
        self.out = Path(out)
        self.plan = plan
        self.slots: dict[str, tuple[int, TensorInfo]] = {}  # name -> (fd, where it goes)
        self.fds: list[int] = []
        self.pending: set[str] = set()
        try:
            for file, entries in plan.items():
                header: dict = {"__metadata__": {**{str(k): str(v) for k, v in metadata.items()}, "format": "pt"}}
                offset = 0
                for name, dtype, shape in entries:
                    n = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
                    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
                    offset += n
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                fd = os.open(self.out / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                _pwrite_all(fd, len(raw).to_bytes(8, "little") + raw, 0)
                os.ftruncate(fd, 8 + len(raw) + offset)
                for name, dtype, shape in entries:
                    begin, end = header[name]["data_offsets"]
                    info = TensorInfo(self.out / file, dtype, tuple(shape), 8 + len(raw) + begin, end - begin)
                    self.slots[name] = (fd, info)
                    self.pending.add(name)
        except BaseException:
            self._close_fds()
            raise

    def _take(self, name: str) -> tuple[int, TensorInfo]:
        if name not in self.pending:
            raise RuntimeError(f"tensor {name} is not in the plan or was written already")
        self.pending.discard(name)
        return self.slots[name]

    def write(self, name: str, tensor: Tensor) -> None:
        fd, info = self._take(name)
        if DTYPE_CODES[tensor.dtype] != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(f"tensor {name}: {tensor.dtype} {list(tensor.shape)} does not match its slot")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(fd, memoryview(data), info.offset)

    def copy(self, name: str, src: Weights) -> None:
        """The bytes of ``src``'s tensor ``name``, unchanged (by the kernel for safetensors sources)."""
        info = src.info(name)
        if info.offset < 0:
            self.write(name, src.read(name))
            return
        fd, slot = self._take(name)
        if (info.dtype, info.shape) != (slot.dtype, slot.shape):
            raise RuntimeError(f"tensor {name}: source and slot differ")
        with open(info.file, "rb", buffering=0) as f:
            _copy_range(f.fileno(), fd, info.offset, slot.offset, info.nbytes)

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        if self.pending:
            self._close_fds()
            raise RuntimeError(f"{len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[0]}")
        for fd in self.fds:
            os.fsync(fd)
        self._close_fds()
        files = list(self.plan)
        if files != [SAFE_NAME]:
            weight_map = {name: file for file, entries in self.plan.items() for name, _, _ in entries}
            total = sum(info.nbytes for _, info in self.slots.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """``count`` bytes from ``src`` to ``dst`` without passing through this process when the kernel
    can (``copy_file_range``), else in 64 MiB chunks."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, 1 << 30), src_offset, dst_offset)
        except (AttributeError, OSError):
            n = 0
        if n <= 0:
            chunk = os.pread(src, min(count, _COPY_CHUNK), src_offset)
            if not chunk:
                raise SvdServeError("a source checkpoint file is truncated")
            _pwrite_all(dst, chunk, dst_offset)
            n = len(chunk)
        src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n


def folded_dtype(ckpt: Weights, dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype a fold of ``ckpt`` writes its dequantized weights in (``--dtype``): required for a
    quantized base, refused for a full-precision one (folded in its own dtype)."""
    from .quant import FLOAT_DTYPES

    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise SvdServeError(f"--dtype {dtype!r} must be one of: {', '.join(FLOAT_DTYPES)}")
        dtype = FLOAT_DTYPES[dtype]
    if ckpt.quantization is None:
        if dtype is not None:
            raise SvdServeError("--dtype applies to quantized bases only: a full-precision base is folded "
                                "in its own dtype")
        return None
    if dtype is None:
        raise SvdServeError(f"the base is a {ckpt.quantization.describe()} quantization: the folded checkpoint "
                            "holds its dequantized weights; choose their dtype with --dtype float16, "
                            "bfloat16 or float32")
    return dtype


def _folded_plan(ckpt: Weights, dtype: torch.dtype, max_shard_size: int | None) -> dict[str, list[tuple]]:
    """The output tensors of a quantized base's fold, per file: each quantized module's tensors become
    one ``weight`` in ``dtype`` (where its first tensor was), every other tensor stays as it is."""
    owner = {n: m for m in ckpt.quantization.modules for n in ckpt.quantization.tensor_names(m, ckpt.tensors)}
    entries: dict[str, tuple] = {}
    for name, info in ckpt.tensors.items():
        if name not in owner:
            entries[name] = (info.dtype, info.shape, info.file.name)
        elif f"{owner[name]}.weight" not in entries:
            w = ckpt.weight_info(owner[name])
            entries[f"{owner[name]}.weight"] = (DTYPE_CODES[dtype], w.shape, info.file.name)
    if max_shard_size is not None:
        sizes = {n: int(np.prod(s, dtype=np.int64)) * SAFETENSORS_DTYPES[d].itemsize for n, (d, s, _) in entries.items()}
        plan = shard_by_size(sizes, max_shard_size)
    else:
        plan = {}
        for name, (_, _, file) in entries.items():
            file = SAFE_NAME if file == BIN_NAME else file.replace("pytorch_model", "model").replace(".bin", ".safetensors")
            plan.setdefault(file, []).append(name)
    return {f: [(n, entries[n][0], entries[n][1]) for n in names] for f, names in plan.items()}


def _dequantized_config(ckpt: Weights, out: Path, dtype: torch.dtype) -> None:
    """``config.json`` of a folded quantized base: no ``quantization_config``, ``dtype`` the fold's."""
    config = json.loads((ckpt.path / "config.json").read_bytes())
    config.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_folded(ckpt: Weights, out: Path, modules: list[str], delta: Callable[[str], LowRank | Tensor],
                 max_shard_size: int | None = None, progress: bool = True, dtype: torch.dtype | None = None) -> None:
    """Write ``ckpt`` to the (empty) directory ``out`` with ``W ← W + ΔW`` for every module of
    ``modules``, where ``ΔW = delta(module)`` (factors ``(A, B)``, or a dense ``[m, n]`` matrix) is
    asked for once per module, in the order given, just before its weight is written (so a caller
    can compute it then, one module at a time).

    ``W + B A`` is computed in float32 and rounded once to the weight's dtype; every other tensor is
    copied unchanged; the files follow the base's shard layout (or ``max_shard_size``) and are
    indexed as ``save_pretrained`` indexes them; config and tokenizer files are copied.

    A quantized base (``ckpt.quantization``) needs ``dtype`` (:func:`folded_dtype`): every quantized
    module is written dequantized (``W_deq + B A`` for ``modules``, in float32 and rounded once to
    ``dtype``), its quantization tensors are not copied, and config.json loses its
    ``quantization_config`` and takes ``dtype``; the unquantized tensors are copied as they are."""
    from tqdm.auto import tqdm

    dtype = folded_dtype(ckpt, dtype)
    keys = {f"{m}.weight": m for m in modules}
    for key, module in keys.items():
        info = ckpt.weight_info(module)
        if info.dtype not in FLOATS:
            raise SvdServeError(f"{key} is stored as {info.dtype}: only float16/bfloat16/float32/float64 "
                                "weights can be folded")
    if dtype is None:
        plan = {f: [(n, ckpt.tensors[n].dtype, ckpt.tensors[n].shape) for n in names]
                for f, names in plan_shards(ckpt, max_shard_size).items()}
        copied, dequantized = list(ckpt.tensors), []
    else:
        plan = _folded_plan(ckpt, dtype, max_shard_size)
        owned = {n for m in ckpt.quantization.modules for n in ckpt.quantization.tensor_names(m, ckpt.tensors)}
        copied = [n for n in ckpt.tensors if n not in owned]
        dequantized = [m for m in sorted(ckpt.quantization.modules) if f"{m}.weight" not in keys]
    writer = ShardWriter(out, plan, ckpt.metadata)
    bar = tqdm(total=sum(len(v) for v in plan.values()), desc="writing", unit="tensor",
               disable=None if progress else True, leave=False)
    scratch = torch.empty(max((ckpt.weight_info(m).numel for m in modules), default=0))  # float32, reused per module
    try:
        for name in copied:
            if name not in keys:
                writer.copy(name, ckpt)
                bar.update()
        for module in dequantized:  # (quantized modules no adapter touches)
            writer.write(f"{module}.weight", ckpt.weight(module).to(dtype))
            bar.update()
        for key, module in keys.items():
            if dtype is None:
                weight = ckpt.read(key)
            else:  # W_deq in float32 (exact), then rounded once to dtype with ΔW added
                weight = ckpt.weight(module).float()
            d = delta(module)
            if isinstance(d, Tensor):  # no product with an identity factor for a dense ΔW
                weight = (weight.float() + d.float()).to(weight.dtype)
            else:
                add_low_rank_(weight, *d, scratch=scratch)
            weight = weight if dtype is None else weight.to(dtype)
            check_finite([(key, weight)], f"refusing to write the folded checkpoint (W + ΔW in the base's {weight.dtype})")
            writer.write(key, weight)
            del weight
            bar.update()
    except BaseException:
        writer._close_fds()
        raise
    finally:
        bar.close()
    writer.close()
    if dtype is not None:
        _dequantized_config(ckpt, out, dtype)
    copy_model_files(ckpt.path, out)
