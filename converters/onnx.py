"""ONNX Runtime: one KV-cache graph of the base, per-request LoRA adapters as ``.onnx_adapter`` files.

Route: onnxruntime-genai's model builder writes the graph (GroupQueryAttention, KV cache,
``genai_config.json``, tokenizer files) from the base plus a PEFT directory that covers the union of
the exported adapters' modules. Its LoRA MatMul weights are then turned into optional graph inputs
(Olive's convention, read by ``ort.RunOptions.add_active_adapter`` and ``og.Adapters``):

- ``<module>.lora_A.weight`` ``[in, r_<module>]`` and ``<module>.lora_B.weight`` ``[r_<module>, out]``,
  HF module names, MatMul layout, the scale folded into B;
- each defaults to a zero-rank initializer, so a run without an adapter is exactly the base;
- one rank symbol per module, so adapters of different ranks and module coverage share a session
  (a shared symbol makes ORT's buffer reuse fail on mixed shapes).

A module an adapter does not cover has no entry in its file; the zero-rank default applies.
The builder splits Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` into separate MatMuls; their parts
share the module's A input and take their column blocks of its B input through one ``Split`` node, so
the adapter file still holds one A and one B per HF module. Only the architectures in
``ARCHITECTURES`` (each checked exact against the adapted HF model in the tests) are exported.
Bases whose head size ONNX Runtime's GroupQueryAttention rejects are refused up front. The builder
runs in a child process that dies with this one, with its scratch space inside the temporary output.
``OUT/manifest.json`` records the base fingerprint, the graph's LoRA modules and every adapter;
each adapter also has a ``<name>.json`` beside it, so that :func:`check_adapter` can refuse a file
exported for another base or carrying a module the graph lacks.

``verify`` runs the graph in an ONNX Runtime session (greedy, KV cache, each adapter active in turn);
``open`` gives :class:`OnnxLM`, onnxruntime-genai with one adapter per request (``svd-serve generate``).
A float16 graph is built for CUDA; without CUDA, ONNX Runtime's CPU provider runs (and checks) it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from svd_serve.converters import ExportedAdapter, ExportJob, Target, read_json
from svd_serve.converters.peft import write_lora_dir
from svd_serve.errors import SvdServeError
from svd_serve.files import atomic_dir
from svd_serve.linalg import LowRank
from svd_serve.verification import BASE, engine, prepare, report

FORMAT = "svd-serve-onnx"
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SUFFIX = ".onnx_adapter"
# the dtypes of an exported graph: --target onnx dtype → (numpy dtype, onnxruntime-genai precision)
ONNX_DTYPES = {"float32": (np.float32, "fp32"), "float16": (np.float16, "fp16")}


def lora_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def builder_name(module: str) -> str:
    """The builder's name for an HF module: ``model.layers.0.self_attn.q_proj`` → ``...attn.q_proj``."""
    return module.replace(".self_attn.", ".attn.")


# HF architectures whose export is checked exact (tests/test_onnx_archs.py)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Phi3ForCausalLM")
# fused HF projections the builder splits into one MatMul per block of output rows, in row order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def builder_parts(module: str) -> list[str]:
    """The builder's MatMuls for an HF module: one, or one per part of a fused projection."""
    parent, leaf = builder_name(module).rsplit(".", 1)
    return [f"{parent}.{part}" for part in FUSED.get(leaf, (leaf,))]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0
    return int(head_dim(config) * factor)


def check_base(architecture: str, config) -> None:
    """Refuse, before anything is built, a base this target cannot export exactly or ONNX Runtime
    cannot run."""
    if architecture not in ARCHITECTURES:
        raise SvdServeError(f"--target onnx does not support {architecture}; supported: {', '.join(ARCHITECTURES)}")
    # The builder fuses rotary embeddings into GroupQueryAttention, which then takes only head sizes
    # (and rotary dimensions) that are multiples of 16 (ORT's group_query_attention_helper.h).
    if head_dim(config) % 16 or rotary_dim(config) % 16:
        raise SvdServeError(f"--target onnx cannot export a model with head_dim {head_dim(config)}"
                            + (f" (rotary dimension {rotary_dim(config)})" if rotary_dim(config) != head_dim(config) else "")
                            + ": ONNX Runtime's GroupQueryAttention with rotary embeddings needs multiples of 16")
    if architecture != "Phi3ForCausalLM":
        return
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (rope.get("rope_type", rope.get("type")) != "longrope"
            and config.max_position_embeddings != config.original_max_position_embeddings):
        # the builder takes any such Phi-3 for a LongRoPE model and fails without its factors
        raise SvdServeError(f"--target onnx cannot export {architecture} with max_position_embeddings "
                            f"{config.max_position_embeddings} != original_max_position_embeddings "
                            f"{config.original_max_position_embeddings} and no longrope scaling")


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def session_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # overridable initializers (the LoRA inputs) are by design
    return opts


def providers() -> list[str]:
    """ONNX Runtime's providers for a session here: CUDA first where there is one, else the CPU
    (which also runs float16 graphs built for CUDA)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


def check_installed(*modules: str) -> None:
    """Refuse, with the install line, when a package this target needs is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SvdServeError(f"--target onnx needs {', '.join(missing)}: pip install 'svd-serve[onnx]' "
                            "(or 'svd-serve[onnx-gpu]')")


def _die_with_parent() -> None:
    """In a child process before it runs: be killed when the parent dies (Linux), so that a killed
    export never leaves the builder running."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- export -------------------------------------------------------------------------------------------
def run_builder(base: Path, peft_dir: Path, out: Path, scratch: Path, precision: str, provider: str) -> None:
    """onnxruntime-genai's model builder in a child process that dies with this one; everything it
    writes besides ``out`` (its cache, temporary files) goes to ``scratch``; its output to the log."""
    base, peft_dir, out, scratch = (p.resolve() for p in (base, peft_dir, out, scratch))  # it runs in scratch
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
           "-p", precision, "-e", provider, "-c", str(scratch), "--extra_options", f"adapter_path={peft_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)}
    with engine("the onnxruntime-genai model builder"):
        proc = subprocess.Popen(cmd, env=env, cwd=scratch, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: take the child down with us
                proc.kill()
                proc.wait()
        if code != 0:
            raise RuntimeError(f"exit status {code}")


def extract_lora_inputs(model_file: Path, modules: dict[str, tuple[int, int]], np_dtype) -> None:
    """Turn the builder's LoRA initializers into optional inputs with zero-rank defaults (in place;
    external data is not loaded: the unused rank-1 placeholders stay as dead bytes in the data file)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rename = {}
    for module, (n_in, n_out) in modules.items():
        a_name, b_name = lora_names(module)
        parts = builder_parts(module)
        a_old = [f"{p}.lora_A.MatMul.weight" for p in parts]
        b_old = [f"{p}.lora_B.MatMul.weight" for p in parts]
        if any(old not in inits for old in a_old + b_old):
            raise SvdServeError(f"the model builder wrote no LoRA for module {module}; "
                                f"exporting it to ONNX is not supported for this architecture")
        sizes = [inits[old].dims[1] for old in b_old]
        if sum(sizes) != n_out:
            raise SvdServeError(f"the model builder split module {module} into {sizes} outputs, not {n_out}")
        for old in a_old + b_old:
            graph.initializer.remove(inits[old])
        rename.update({old: a_name for old in a_old})
        if len(parts) == 1:
            rename[b_old[0]] = b_name
        else:  # each part's B is a block of columns of the module's B [r, out]
            split = f"{b_name}.split"
            outputs = [f"{b_name}.{p.rsplit('.', 1)[1]}" for p in parts]
            graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), split))
            graph.node.insert(0, helper.make_node("Split", [b_name, split], outputs, axis=1,
                                                  name=f"/{builder_name(module)}/lora_B/Split"))
            rename.update(zip(b_old, outputs))
        rank = f"r.{module}"
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
        graph.input.append(helper.make_tensor_value_info(a_name, elem, [n_in, rank]))
        graph.input.append(helper.make_tensor_value_info(b_name, elem, [rank, n_out]))
        graph.initializer.append(numpy_helper.from_array(np.zeros((n_in, 0), np_dtype), a_name))
        graph.initializer.append(numpy_helper.from_array(np.zeros((0, n_out), np_dtype), b_name))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # shapes inferred by the builder with its placeholder rank would contradict the symbols
    stale = [vi for vi in graph.value_info if "lora" in vi.name]
    for vi in stale:
        graph.value_info.remove(vi)
    onnx.save(model, str(model_file))


def quiet_genai_config(path: Path) -> None:
    """ORT warns once per LoRA input that an overridable initializer is not constant: by design here."""
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["log_severity_level"] = 3
    path.write_text(json.dumps(config, indent=4) + "\n")


def write_adapter(adapter: ExportedAdapter, path: Path, np_dtype) -> None:
    import onnxruntime as ort

    params = {}
    for module in adapter.A:
        a_name, b_name = lora_names(module)
        a = adapter.A[module].float().T.contiguous().numpy().astype(np_dtype)  # [in, r]
        b = adapter.B[module].float().T.contiguous().numpy().astype(np_dtype)  # [r, out]
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(a)
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(b)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))


def adapter_meta(adapter: ExportedAdapter, fp: str, dtype: str) -> dict:
    ranks = {m: int(a.shape[0]) for m, a in adapter.A.items()}
    return {"format": FORMAT, "name": adapter.name, "file": adapter.name + SUFFIX, "base_fingerprint": fp,
            "dtype": dtype, "rank": max(ranks.values()), "ranks": ranks, "modules": list(ranks),
            "source": str(adapter.path)}


def export(job: ExportJob, out: Path) -> dict:
    from transformers import AutoConfig

    from svd_serve.model import fingerprint, load_base

    dtype = job.options.get("dtype") or ("float16" if cuda_available() else "float32")
    if dtype not in ONNX_DTYPES:
        raise SvdServeError(f"--target onnx writes float32 (CPU) or float16 (CUDA) graphs, not {dtype}")
    np_dtype, precision = ONNX_DTYPES[dtype]
    provider = "cuda" if dtype == "float16" or cuda_available() else "cpu"  # what the graph is built for
    check_installed("onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai", "peft")
    check_base(job.architecture, AutoConfig.from_pretrained(job.base))
    order = {m: i for i, m in enumerate(job.linear_modules)}
    union = sorted({m for a in job.adapters for m in a.A}, key=order.__getitem__)
    model = load_base(job.base)  # float32: the fingerprint, the shapes and the reference of the check
    fp = fingerprint(model, job.linear_modules)
    shapes = {m: tuple(reversed(model.get_submodule(m).weight.shape)) for m in union}  # (in, out)

    # a placeholder adapter on the union (rank 1, zeros): only the graph's structure is kept
    placeholder = ExportedAdapter(
        name="union", path=job.base, config={},
        A={m: torch.zeros(1, shapes[m][0]) for m in union},
        B={m: torch.zeros(shapes[m][1], 1) for m in union}, rel_error={m: 0.0 for m in union})
    with atomic_dir(out, overwrite=job.overwrite) as tmp:
        scratch = tmp / ".build"  # inside the temporary output: a killed run leaves nothing elsewhere
        scratch.mkdir()
        write_lora_dir(placeholder, job, scratch / "peft")
        run_builder(job.base.resolve(), scratch / "peft", tmp.resolve(), scratch, precision, provider)
        shutil.rmtree(scratch)
        extract_lora_inputs(tmp / MODEL, shapes, np_dtype)
        quiet_genai_config(tmp / "genai_config.json")
        (tmp / "adapters").mkdir()
        metas = {}
        for adapter in job.adapters:
            meta = adapter_meta(adapter, fp, dtype)
            write_adapter(adapter, tmp / "adapters" / meta["file"], np_dtype)
            (tmp / "adapters" / f"{adapter.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
            metas[adapter.name] = meta
        manifest = {
            "format": FORMAT, "format_version": 1, "base": str(job.base.resolve()), "base_fingerprint": fp,
            **({"base_source": job.base_source} if job.base_source else {}), "architecture": job.architecture, "model_type": job.model_type, "dtype": dtype,
            "provider": provider, "lora_modules": {m: list(s) for m, s in shapes.items()},
            "adapters": {n: {k: m[k] for k in ("file", "rank", "ranks", "modules")} for n, m in metas.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        written = smoke_check(tmp, model, job.adapters)
    messages = []
    used = {w["provider"] for w in written.values()}
    if provider == "cuda" and "CUDAExecutionProvider" not in used:
        messages.append(f"note: the {dtype} graph is built for CUDA; this machine has none, so ONNX Runtime "
                        f"checked it with {', '.join(sorted(used))}")
    for adapter in job.adapters:
        written[adapter.name]["path"] = str(out / "adapters" / (adapter.name + SUFFIX))
    return {**written, "messages": messages}


@torch.no_grad()
def smoke_check(onnx_dir: Path, model, adapters: list[ExportedAdapter]) -> dict:
    """One session, every adapter in turn on random tokens: max |Δ logits| against torch
    (base + B A on each covered module) and the provider ORT actually used."""
    from svd_serve.model import LowRankDelta, attach, detach

    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    refs = {}
    for adapter in adapters:
        attach(model, {m: LowRankDelta(adapter.A[m], adapter.B[m]) for m in adapter.A})
        try:
            refs[adapter.name] = model(input_ids=ids).logits.float().numpy()
        finally:
            detach(model)
    out = {}
    with engine("ONNX Runtime"):
        sess = session(onnx_dir)
        feed = prefill_feed(onnx_dir, sess, ids.numpy())
        for adapter in adapters:
            lora = load_lora(onnx_dir / "adapters" / (adapter.name + SUFFIX))
            logits = sess.run(["logits"], feed, run_options(lora))[0]
            out[adapter.name] = {"onnx_max_logit_gap": float(np.abs(logits.astype(np.float32) - refs[adapter.name]).max()),
                                 "provider": sess.get_providers()[0]}
    return out


# --- serving helpers ------------------------------------------------------------------------------------
def session(onnx_dir: str | Path):
    """An ONNX Runtime session over the export's graph (CUDA where there is one, else the CPU)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(Path(onnx_dir) / MODEL), session_options(), providers=providers())


def load_lora(adapter_file: Path):
    """An ``ort.LoraAdapter`` from a file; keep it alive while runs use it (RunOptions holds no reference)."""
    import onnxruntime as ort

    lora = ort.LoraAdapter()
    lora.Load(str(adapter_file))
    return lora


def run_options(lora=None):
    """``RunOptions`` with ``lora`` (from :func:`load_lora`) active; None: the base."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    if lora is not None:
        opts.add_active_adapter(lora)
    return opts


def session_greedy(sess, onnx_dir: Path, ids: list[int], opts, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from the session, one KV-cache step per token."""
    names = [o.name for o in sess.get_outputs()]
    feed = prefill_feed(onnx_dir, sess, np.array([ids]))
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        outs = dict(zip(names, sess.run(None, feed, opts)))
        logits = outs["logits"][0, -1].astype(np.float64)
        lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        feed = {"input_ids": np.array([[tok]], np.int64),
                "attention_mask": np.ones((1, len(ids) + len(tokens)), np.int64),
                **{k.replace("present", "past_key_values"): v for k, v in outs.items() if k.startswith("present")}}
    return tokens, logprobs


def read_parameters(path: Path) -> dict[str, np.ndarray]:
    """An ``.onnx_adapter`` file's tensors, copied out while the file's reader is alive (its values
    point into the reader's memory)."""
    import onnxruntime as ort

    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
        return {k: np.array(v.numpy(), copy=True) for k, v in reader.get_parameters().items()}
    except Exception as e:
        raise SvdServeError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def adapter_factors(path: Path) -> dict[str, LowRank]:
    """An ``.onnx_adapter`` file's factors as ``ΔW = B A`` per module (float32)."""
    params = read_parameters(path)
    out = {}
    for name, a in params.items():
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b = params[lora_names(module)[1]]
            out[module] = LowRank(torch.from_numpy(a.astype(np.float32)).T.contiguous(),
                                  torch.from_numpy(b.astype(np.float32)).T.contiguous())
    return out


def prefill_feed(onnx_dir: str | Path, sess, input_ids: np.ndarray) -> dict:
    """Inputs for a first run: ``input_ids``, an all-ones mask and empty KV caches."""
    decoder = json.loads((Path(onnx_dir) / "genai_config.json").read_text())["model"]["decoder"]
    feed = {"input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones_like(input_ids, dtype=np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in inp.type else np.float32
            shape = (input_ids.shape[0], decoder["num_key_value_heads"], 0, decoder["head_size"])
            feed[inp.name] = np.zeros(shape, dtype)
    return feed


def read_manifest(onnx_dir: str | Path) -> dict:
    manifest = read_json(Path(onnx_dir) / MANIFEST, f"{onnx_dir} is not an svd-serve ONNX export: no {MANIFEST}")
    if manifest.get("format") != FORMAT:
        raise SvdServeError(f"{Path(onnx_dir) / MANIFEST}: not an svd-serve ONNX manifest")
    return manifest


def graph_lora_inputs(onnx_dir: str | Path) -> dict[str, list]:
    """LoRA input name → shape (ints and rank symbols), read from the graph itself."""
    import onnx

    model = onnx.load(str(Path(onnx_dir) / MODEL), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name in inits}


def resolve_adapter(onnx_dir: str | Path, adapter: str | Path) -> Path:
    """An adapter name from the manifest, or a path to an ``.onnx_adapter`` file."""
    path = Path(adapter)
    if path.suffix == SUFFIX or os.sep in str(adapter):
        if not path.is_file():
            raise SvdServeError(f"adapter file not found: {path}")
        return path
    manifest = read_manifest(onnx_dir)
    if str(adapter) not in manifest["adapters"]:
        raise SvdServeError(f"unknown adapter {adapter!r}; this export has: "
                            f"{', '.join(manifest['adapters']) or 'none'}")
    return Path(onnx_dir) / "adapters" / manifest["adapters"][str(adapter)]["file"]


def check_adapter(onnx_dir: str | Path, adapter: str | Path) -> Path:
    """Refuse an adapter file that was exported for another base, or whose parameters the graph
    lacks or cannot take (shape, dtype). Returns the file's path."""
    manifest = read_manifest(onnx_dir)
    path = resolve_adapter(onnx_dir, adapter)
    meta_file = path.with_name(path.name[: -len(SUFFIX)] + ".json") if path.name.endswith(SUFFIX) else None
    if meta_file is None or not meta_file.is_file():
        raise SvdServeError(f"{path} has no metadata ({path.stem}.json beside it): cannot check its base")
    meta = json.loads(meta_file.read_text())
    if meta.get("base_fingerprint") != manifest["base_fingerprint"]:
        raise SvdServeError(f"adapter {path.name} was exported for another base (fingerprint "
                            f"{meta.get('base_fingerprint')} != {manifest['base_fingerprint']} of {onnx_dir})")
    graph = graph_lora_inputs(onnx_dir)
    params = read_parameters(path)
    want = np.float16 if manifest["dtype"] == "float16" else np.float32
    for name, array in params.items():
        if name not in graph:
            raise SvdServeError(f"adapter {path.name} has module {name.rsplit('.lora_', 1)[0]}, "
                                f"which the graph in {onnx_dir} lacks")
        fixed = [d for d in graph[name] if isinstance(d, int)]
        if array.ndim != 2 or [array.shape[0 if name.endswith("lora_A.weight") else 1]] != fixed:
            raise SvdServeError(f"adapter {path.name}: {name} has shape {list(array.shape)}, "
                                f"the graph expects {graph[name]}")
        if array.dtype != want:
            raise SvdServeError(f"adapter {path.name}: {name} is {array.dtype}, the graph is {manifest['dtype']}")
    return path


# --- runtime: onnxruntime-genai, one adapter per request ------------------------------------------------
def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SvdServeError("onnxruntime-genai is not installed: pip install 'svd-serve[onnx]' "
                            "(or 'svd-serve[onnx-gpu]')") from None
    return og


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise SvdServeError("--max-new-tokens must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SvdServeError(f"--temperature must be a finite number >= 0, not {temperature}")


@dataclass
class OnnxLM:
    """An exported folder opened once; adapters load lazily and are served per request."""

    path: Path
    manifest: dict
    model: object
    tokenizer: object
    adapters: object
    provider: str  # "cpu" or "cuda": where onnxruntime-genai runs the graph
    loaded: set = field(default_factory=set)

    @classmethod
    def open(cls, path: str | Path) -> "OnnxLM":
        og = _genai()
        path = Path(path)
        manifest = read_manifest(path)
        provider = manifest.get("provider", "cpu")
        try:
            config = og.Config(str(path))
            if provider != "cpu" and not cuda_available():  # a graph built for CUDA also runs on the CPU
                config.clear_providers()
                provider = "cpu"
            model = og.Model(config)
        except Exception as e:
            raise SvdServeError(f"onnxruntime-genai cannot load {path}: {str(e).splitlines()[0]}") from None
        return cls(path, manifest, model, og.Tokenizer(model), og.Adapters(model), provider)

    def load_adapter(self, adapter: str | Path) -> str:
        """Check (base fingerprint, modules, shapes) and load an adapter; returns its name."""
        file = check_adapter(self.path, adapter)
        name = file.name.removesuffix(SUFFIX)
        if name not in self.loaded:
            self.adapters.load(str(file), name)
            self.loaded.add(name)
        return name

    def generate_ids(self, ids: list[int], adapter: str | Path | None = None, max_new_tokens: int = 32,
                     temperature: float = 0.0, seed: int | None = None) -> list[int]:
        """New token ids after ``ids``: greedy when ``temperature`` is 0, else sampled (top-k off,
        top-p 1); stops at EOS or after ``max_new_tokens``."""
        og = _genai()
        check_generation(max_new_tokens, temperature)
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

    def generate(self, prompt: str, adapter: str | Path | None = None, **kw) -> str:
        ids = [int(t) for t in self.tokenizer.encode(prompt)]
        return self.tokenizer.decode(self.generate_ids(ids, adapter, **kw))


class OnnxTarget(Target):
    name = "onnx"
    help = "one ONNX graph of the base (KV cache) and an .onnx_adapter file per adapter"

    def export(self, job: ExportJob, out: Path) -> dict:
        return export(job, out)

    def verify(self, base: Path, export_dir: Path, options):
        """An ONNX Runtime session (greedy, KV cache, each adapter active in turn) against the Hugging
        Face model with the factors of the same ``.onnx_adapter`` files."""
        import onnxruntime as ort

        check_installed("onnx", "onnxruntime")
        manifest = read_manifest(export_dir)
        files = {n: check_adapter(export_dir, n) for n in manifest["adapters"]}
        factors = {n: adapter_factors(f) for n, f in files.items()}
        _, ids, ref = prepare(base, factors, [(f"the export {export_dir}", manifest["base_fingerprint"], None)],
                              options)
        with engine("ONNX Runtime") as log:
            sess = session(export_dir)
            loras = {n: load_lora(f) for n, f in files.items()}
            got = {n: [session_greedy(sess, export_dir, i, run_options(loras.get(n)), options.max_new_tokens)
                       for i in ids] for n in [BASE, *files]}
        runtime = f"ONNX Runtime {ort.__version__} ({sess.get_providers()[0]}, {manifest['dtype']})"
        return report(self.name, runtime, ref, got, options, manifest["dtype"], log)

    def open(self, export_dir: Path) -> OnnxLM:
        return OnnxLM.open(export_dir)
