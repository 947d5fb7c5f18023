"""``svd-serve generate``: text generation from an ONNX export with onnxruntime-genai, one adapter
per request (or none: the base). Adapters are checked against the export before they are loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .converters.onnx import check_adapter, read_manifest
from .errors import SvdServeError


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SvdServeError("onnxruntime-genai is not installed: pip install 'svd-serve[onnx]' "
                            "(or 'svd-serve[onnx-gpu]')") from None
    return og


@dataclass
class OnnxLM:
    """An exported folder opened once; adapters load lazily and are served per request."""

    path: Path
    manifest: dict
    model: object
    tokenizer: object
    adapters: object
    loaded: set = field(default_factory=set)

    @classmethod
    def open(cls, path: str | Path) -> "OnnxLM":
        og = _genai()
        path = Path(path)
        manifest = read_manifest(path)
        try:
            model = og.Model(str(path))
        except Exception as e:
            raise SvdServeError(f"onnxruntime-genai cannot load {path}: {str(e).splitlines()[0]}") from None
        return cls(path, manifest, model, og.Tokenizer(model), og.Adapters(model))

    @property
    def provider(self) -> str:
        opts = json.loads((self.path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        names = [name for entry in opts.get("provider_options", []) for name in entry]
        return names[0] if names else "cpu"

    def load_adapter(self, adapter: str | Path) -> str:
        """Check (base fingerprint, modules, shapes) and load an adapter; returns its name."""
        file = check_adapter(self.path, adapter)
        name = file.name.removesuffix(".onnx_adapter")
        if name not in self.loaded:
            self.adapters.load(str(file), name)
            self.loaded.add(name)
        return name

    def generate_ids(self, ids: list[int], adapter: str | None = None, max_new_tokens: int = 32,
                     temperature: float = 0.0, seed: int | None = None) -> list[int]:
        """New token ids after ``ids``: greedy when ``temperature`` is 0, else sampled (top-k off,
        top-p 1); stops at EOS or after ``max_new_tokens``."""
        og = _genai()
        if max_new_tokens < 1:
            raise SvdServeError("--max-new-tokens must be at least 1")
        if temperature < 0:
            raise SvdServeError("--temperature must be >= 0")
        if not ids:
            raise SvdServeError("empty prompt")
        name = self.load_adapter(adapter) if adapter is not None else None
        params = og.GeneratorParams(self.model)
        search = {"max_length": len(ids) + max_new_tokens, "do_sample": temperature > 0,
                  "num_beams": 1, "top_p": 1.0, "repetition_penalty": 1.0}
        if temperature > 0:
            search.update(temperature=temperature, top_k=0)
            if seed is not None:
                search["random_seed"] = seed
        params.set_search_options(**search)
        gen = og.Generator(self.model, params)
        if name is not None:
            gen.set_active_adapter(self.adapters, name)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[len(ids):]]

    def generate(self, prompt: str, adapter: str | None = None, **kw) -> str:
        ids = [int(t) for t in self.tokenizer.encode(prompt)]
        return self.tokenizer.decode(self.generate_ids(ids, adapter, **kw))


def generate(onnx_dir: str | Path, prompt: str, adapter: str | None = None, **kw) -> str:
    return OnnxLM.open(onnx_dir).generate(prompt, adapter, **kw)
