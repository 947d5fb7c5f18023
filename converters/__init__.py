"""Serving targets: adding a target is one file in this folder plus one line in ``TARGETS``.

A target is a :class:`Target`: ``export`` receives an :class:`ExportJob` (each adapter's exact ΔW
factors against the original base, already in their smallest exact rank or truncated to
``--max-rank``) and writes files; ``verify`` runs a written export in the target's own runtime
against the Hugging Face model (``svd-serve verify``); a target with a runtime in svd-serve also
has ``open`` (``svd-serve generate``). Targets never see method internals: they get factors
(:class:`ExportedAdapter`), never a method module.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from svd_serve.errors import SvdServeError

if TYPE_CHECKING:
    from svd_serve.verification import Verification, VerifyOptions

# the files of a native adapter (svd_serve/adapter.py), hashed to recognise an unchanged adapter
NATIVE_FILES = ("svd_adapter.json", "svd_adapter.safetensors")


@dataclass
class ExportedAdapter:
    name: str  # the adapter directory's name; output names derive from it
    path: Path
    config: dict  # the native svd_adapter.json
    A: dict[str, Tensor]  # module name -> [rank, in]
    B: dict[str, Tensor]  # module name -> [out, rank]
    rel_error: dict[str, float]  # module name -> relative Frobenius error (0.0 when exact)
    # module name -> [relative Frobenius error, relative output error on calibration rows], where measured
    errors: dict[str, list] = field(default_factory=dict)
    # written against a served (quantized) base instead of the original: svd_serve.served's report
    served: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a in self.A.values())

    @classmethod
    def from_adapter(cls, name: str, path: str | Path, adapters, max_rank: int | None = None,
                     weights=None) -> "ExportedAdapter":
        """The exact ΔW factors of a loaded :class:`svd_serve.adapter.AdapterSet` (its smallest exact
        rank, or the best rank-``max_rank`` approximation with its error), in the norm of ``weights``
        (:class:`svd_serve.calib.TruncationWeights`) where given."""
        from svd_serve.calib import module_errors

        deltas = adapters.deltas(max_rank, weights)
        return cls(name=name, path=Path(path), config=adapters.config.__dict__.copy(),
                   A={n: d.A for n, d in deltas.items()}, B={n: d.B for n, d in deltas.items()},
                   rel_error={n: d.rel_error for n, d in deltas.items()},
                   errors=module_errors(deltas) if weights is not None else {})


@dataclass
class ExportJob:
    base: Path
    adapters: list[ExportedAdapter]
    linear_modules: list[str]  # every nn.Linear of the base, for target_modules
    architecture: str
    model_type: str
    options: dict = field(default_factory=dict)  # target-specific options from the CLI
    overwrite: bool = False  # replace an earlier svd-serve output at ``out`` (never anything else)
    # the base as named and resolved (svd_serve.hub.Source.record: name, Hub repo id, revision, commit),
    # recorded next to the fingerprint in what is written
    base_source: dict = field(default_factory=dict)


class Target:
    """One serving target. Subclasses set ``name`` and ``help`` and implement ``export`` and
    ``verify``; ``open`` is for targets whose runtime svd-serve drives itself."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line, shown by `svd-serve export --help` and `verify --help`

    def export(self, job: ExportJob, out: Path) -> dict:
        """Write ``job`` under ``out`` (atomically); returns ``{adapter name: {...}, "messages": [...]}``."""
        raise NotImplementedError

    def verify(self, base: Path, export_dir: Path, options: "VerifyOptions") -> "Verification":
        """Run ``export_dir`` in this target's runtime on ``base`` and compare greedy tokens and their
        logprobs with the Hugging Face model (base and every adapter)."""
        raise NotImplementedError

    def open(self, export_dir: Path):
        """A runtime session over ``export_dir`` (``svd-serve generate``)."""
        raise SvdServeError(f"svd-serve has no runtime for --target {self.name}; "
                            f"generate runs: {', '.join(n for n in TARGETS if get_target(n).has_runtime)}")

    @property
    def has_runtime(self) -> bool:
        return type(self).open is not Target.open


# target name -> "module:class"; modules are imported only when their target is used
TARGETS: dict[str, str] = {
    "peft": "svd_serve.converters.peft:PeftTarget",
    "vllm": "svd_serve.converters.vllm:VllmTarget",
    "onnx": "svd_serve.converters.onnx:OnnxTarget",
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise SvdServeError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def adapter_hash(path: str | Path) -> str:
    """Content hash of a native adapter's files: equal hashes, equal adapters."""
    h = hashlib.sha256()
    for name in NATIVE_FILES:
        h.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_json(path: Path, missing: str) -> dict:
    """A JSON object from ``path``; ``missing`` is the error when the file does not exist."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SvdServeError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SvdServeError(f"{path} is corrupt: {e}") from None
    if not isinstance(value, dict):
        raise SvdServeError(f"{path} is corrupt: not a JSON object")
    return value
