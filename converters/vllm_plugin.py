"""A vLLM plugin that serves native svd-serve adapters by name.

With ``SVD_SERVE_ADAPTER_ROOT=DIR`` (and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), a request for
model ``x`` that vLLM does not know resolves to the svd-serve adapter ``DIR/x``: on first use it is
converted to an exact PEFT LoRA in a cache directory (``SVD_SERVE_LORA_CACHE``, default
``$VLLM_CACHE_ROOT/svd_serve_lora``) under a name derived from the content hash of its files, so a
changed adapter is converted again and an unchanged one never is. A file lock makes concurrent first
requests (threads or API-server processes) convert once.

Registration runs in every vLLM process. It corrects vLLM's CPU LoRA ops where they serve a request
without a LoRA with the last slot's LoRA (:mod:`svd_serve.converters.vllm_lora_fix`), with or without
an adapter root, and registers the resolver only when ``SVD_SERVE_ADAPTER_ROOT`` is set; the converter
is imported on the first resolution.

An adapter is checked against vLLM's model before it is served (its base fingerprint): a model given
as a Hugging Face Hub id is found in the Hugging Face cache, at ``SVD_SERVE_BASE_REVISION`` where vLLM
was given a ``--revision`` (``svd-serve serve`` passes vLLM the snapshot directory itself).

With ``SVD_SERVE_SERVED_BASE=DIR`` (the quantized checkpoint vLLM runs) and ``SVD_SERVE_CALIB_DATA=FILE``,
native adapters are converted aware of the served base, as ``export --served-base DIR --calib-data FILE``
does (:mod:`svd_serve.served`): the LoRA that best reproduces the full-precision adapted model on it.
The full-precision base is ``SVD_SERVE_FULL_BASE`` (default: the base recorded in the adapter), the rank
``SVD_SERVE_SERVED_MAX_RANK`` (default: each module's exact rank plus the adapter's r; vLLM's
``--max-lora-rank`` must hold it). Conversions are cached per adapter and per served base and calibration.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

ROOT_ENV = "SVD_SERVE_ADAPTER_ROOT"
CACHE_ENV = "SVD_SERVE_LORA_CACHE"
REVISION_ENV = "SVD_SERVE_BASE_REVISION"  # vLLM's --revision of a Hub id model (the resolver is not told it)
# adapters converted aware of a quantized served base (svd_serve.served; `export --served-base`):
SERVED_ENV = "SVD_SERVE_SERVED_BASE"  # the quantized checkpoint vLLM runs (a local directory)
CALIB_ENV = "SVD_SERVE_CALIB_DATA"  # the calibration rows (JSONL) the aware factors are fitted on: needed
FULL_ENV = "SVD_SERVE_FULL_BASE"  # the full-precision base (default: the adapter's recorded base_model)
SERVED_RANK_ENV = "SVD_SERVE_SERVED_MAX_RANK"  # K (default: each module's exact rank plus the adapter's r)

logger = logging.getLogger("vllm.plugins.svd_serve")  # under vLLM's configured logger


def register() -> None:
    """Entry point of group ``vllm.general_plugins``."""
    from svd_serve.converters import vllm_lora_fix

    vllm_lora_fix.install()
    root = os.environ.get(ROOT_ENV)
    if not root:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("svd_serve", make_resolver(root, cache_dir()))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    vllm_cache = os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm"
    return Path(vllm_cache) / "svd_serve_lora"


def adapter_dir(root: str | Path, name: str) -> Path | None:
    """``root/name`` if ``name`` is a plain entry of ``root`` that stays inside it (symlinks
    resolved) and holds a native adapter; None otherwise."""
    root = Path(root).resolve()
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    path = (root / name).resolve()
    if path.parent != root or not (path / "svd_adapter.json").is_file():
        return None
    return path


def convert(src: Path, cache: Path, name: str, base: str | None = None) -> Path:
    """The PEFT form of native adapter ``src``, converted at most once per content."""
    import fcntl

    from svd_serve.converters import adapter_hash

    cache.mkdir(parents=True, exist_ok=True)
    settings = served_settings()
    out = cache / (f"{name}-{adapter_hash(src)}" + (f"-served-{served_key(settings)}" if settings else ""))
    if (out / "adapter_model.safetensors").is_file():
        return out
    with open(cache / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "adapter_model.safetensors").is_file():
                write_peft(src, out, name, base)
                logger.info("svd-serve: converted adapter %s to %s", name, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def write_peft(src: Path, out: Path, name: str, base: str | None) -> None:
    from svd_serve.adapter import AdapterSet
    from svd_serve.converters import ExportedAdapter, ExportJob
    from svd_serve.converters.peft import write_lora_dir
    from svd_serve.converters.vllm import check_servable

    settings = served_settings()
    if settings:
        write_served(src, out, name, settings)
        return
    adapters = AdapterSet.load(src)
    base_dir = served_base_dir(base)
    if base_dir is not None:
        check_base_weights(adapters, base_dir)
    exported = ExportedAdapter.from_adapter(name, src, adapters)
    arch = adapters.config.architecture
    check_servable(arch, [exported])
    job = ExportJob(base=Path(base or adapters.config.base_model), adapters=[exported],
                    linear_modules=list(exported.A), architecture=arch, model_type="")
    write_lora_dir(exported, job, out)


def served_settings() -> dict | None:
    """``$SVD_SERVE_SERVED_BASE`` and what goes with it, or None when native adapters are converted
    exactly (against the original base)."""
    served = os.environ.get(SERVED_ENV)
    if not served:
        return None
    rank = os.environ.get(SERVED_RANK_ENV)
    if rank and not (rank.isdigit() and int(rank) > 0):
        from svd_serve.errors import SvdServeError

        raise SvdServeError(f"{SERVED_RANK_ENV} must be a positive integer, not {rank!r}")
    return {"served": served, "calib": os.environ.get(CALIB_ENV) or None, "full": os.environ.get(FULL_ENV) or None,
            "max_rank": int(rank) if rank else None}


def served_key(settings: dict) -> str:
    """A digest of the settings, the calibration file and the served checkpoint's config and file sizes
    and times: a conversion is cached per adapter and per served base it was fitted to."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    calib = settings["calib"]
    if calib and Path(calib).is_file():
        h.update(Path(calib).read_bytes())
    served = Path(settings["served"])
    for f in sorted(served.glob("*.json")) + sorted(served.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def write_served(src: Path, out: Path, name: str, settings: dict) -> None:
    """The PEFT form of native adapter ``src`` written against the served base of ``settings``
    (:func:`svd_serve.served.served_adapter`): checked against the full-precision base, fitted on the
    calibration rows (the full-precision adapted model is loaded once per conversion)."""
    from svd_serve.adapter import AdapterSet
    from svd_serve.converters import ExportJob
    from svd_serve.converters.peft import write_lora_dir
    from svd_serve.converters.vllm import check_servable
    from svd_serve.errors import SvdServeError
    from svd_serve.served import open_served, served_adapter
    from svd_serve.weights import Weights

    if not settings["calib"]:
        raise SvdServeError(f"{SERVED_ENV} needs {CALIB_ENV}=FILE: the factors for the served base minimise "
                            "each module's output error on the inputs of those rows")
    adapters = AdapterSet.load(src)
    full = Weights(settings["full"] or adapters.config.base_model)
    adapters.check_base(full)
    exported = served_adapter(name, src, adapters, full, open_served(settings["served"]), settings["calib"],
                              settings["max_rank"])
    check_servable(adapters.config.architecture, [exported])
    job = ExportJob(base=Path(settings["served"]), adapters=[exported], linear_modules=list(exported.A),
                    architecture=adapters.config.architecture, model_type="")
    write_lora_dir(exported, job, out)


def served_base_dir(base: str | None) -> Path | None:
    """The local directory of vLLM's model ``base``: a directory, or a Hub id's snapshot in the Hugging
    Face cache (vLLM downloaded it there) at ``$SVD_SERVE_BASE_REVISION`` (default: its main branch),
    found without asking the Hub; None where there is none (vLLM's own checks still apply)."""
    from svd_serve.errors import SvdServeError
    from svd_serve.hub import resolve

    if not base:
        return None
    if Path(base).is_dir():
        return Path(base)
    try:
        return resolve(base, os.environ.get(REVISION_ENV) or None, cache_only=True).path
    except SvdServeError as e:
        logger.warning("svd-serve: the adapter is not checked against the base %s: %s", base, e)
        return None


def check_base_weights(adapters, base: Path) -> None:
    """The adapter's base fingerprint against the served checkpoint, from its files
    (:class:`svd_serve.weights.Weights` reads only the fingerprint's samples; no model is built)."""
    from svd_serve.errors import SvdServeError
    from svd_serve.weights import Weights

    try:
        ckpt = Weights(base)
    except SvdServeError:
        return  # not a checkpoint svd-serve reads: vLLM's own checks still apply
    targets = list(adapters.config.targets)
    if any(f"{m}.weight" not in ckpt.tensors for m in targets):
        return  # not a plain HF checkpoint layout: vLLM's own shape checks still apply
    if ckpt.fingerprint(targets) != adapters.config.base_fingerprint:
        raise SvdServeError(f"the adapter was initialised from a different base than {base}")


def make_resolver(root: str | Path, cache: Path):
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from svd_serve.errors import SvdServeError

    class SvdServeResolver(LoRAResolver):
        """Resolves model ``x`` to the native adapter ``root/x``, converted on first use."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            src = adapter_dir(root, lora_name)
            if src is None:
                return None
            try:
                path = await asyncio.to_thread(convert, src, cache, lora_name, base_model_name)
            except SvdServeError as e:  # vLLM answers a ValueError with 400 and its message
                logger.warning("svd-serve: cannot serve adapter %s: %s", lora_name, e)
                raise ValueError(f"svd-serve adapter {lora_name!r}: {e}") from None
            # vLLM replaces lora_int_id with its own counter value
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path),
                               base_model_name=base_model_name)

    return SvdServeResolver()
