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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

ROOT_ENV = "SVD_SERVE_ADAPTER_ROOT"
CACHE_ENV = "SVD_SERVE_LORA_CACHE"

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
    out = cache / f"{name}-{adapter_hash(src)}"
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

    adapters = AdapterSet.load(src)
    if base and Path(base).is_dir():
        check_base_weights(adapters, Path(base))
    exported = ExportedAdapter.from_adapter(name, src, adapters)
    arch = adapters.config.architecture
    check_servable(arch, [exported])
    job = ExportJob(base=Path(base or adapters.config.base_model), adapters=[exported],
                    linear_modules=list(exported.A), architecture=arch, model_type="")
    write_lora_dir(exported, job, out)


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
