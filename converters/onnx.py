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
``OUT/manifest.json`` records the base fingerprint, the graph's LoRA modules and every adapter;
each adapter also has a ``<name>.json`` beside it, so that :func:`check_adapter` can refuse a file
exported for another base or carrying a module the graph lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from svd_serve.converters import ExportedAdapter, ExportJob
from svd_serve.converters.peft import write_lora_dir
from svd_serve.errors import SvdServeError
from svd_serve.io import atomic_dir

FORMAT = "svd-serve-onnx"
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SUFFIX = ".onnx_adapter"
DTYPES = {"float32": (np.float32, "fp32"), "float16": (np.float16, "fp16")}


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


def check_architecture(architecture: str, config) -> None:
    """Refuse, before anything is built, a base this target cannot export exactly."""
    if architecture not in ARCHITECTURES:
        raise SvdServeError(f"--target onnx does not support {architecture}; supported: {', '.join(ARCHITECTURES)}")
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


def providers(provider: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]


# --- export -------------------------------------------------------------------------------------------
def run_builder(base: Path, peft_dir: Path, out: Path, cache: Path, precision: str, provider: str) -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnx_ir", "onnxruntime_genai", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise SvdServeError(f"--target onnx needs {', '.join(missing)}: pip install 'svd-serve[onnx]' "
                            "(or 'svd-serve[onnx-gpu]')")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
           "-p", precision, "-e", provider, "-c", str(cache), "--extra_options", f"adapter_path={peft_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cache)
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        raise SvdServeError(f"the onnxruntime-genai model builder failed on {base}: "
                            f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")


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
    from svd_serve.model import fingerprint, load_base

    dtype = job.options.get("dtype") or ("float16" if cuda_available() else "float32")
    np_dtype, precision = DTYPES[dtype]
    provider = "cuda" if dtype == "float16" or cuda_available() else "cpu"
    order = {m: i for i, m in enumerate(job.linear_modules)}
    union = sorted({m for a in job.adapters for m in a.A}, key=order.__getitem__)
    model = job.model if job.model is not None else load_base(job.base)
    check_architecture(job.architecture, model.config)
    fp = fingerprint(model, job.linear_modules)
    shapes = {m: tuple(reversed(model.get_submodule(m).weight.shape)) for m in union}  # (in, out)

    # a placeholder adapter on the union (rank 1, zeros): only the graph's structure is kept
    placeholder = ExportedAdapter(
        name="union", path=job.base, config={},
        A={m: torch.zeros(1, shapes[m][0]) for m in union},
        B={m: torch.zeros(shapes[m][1], 1) for m in union}, rel_error={m: 0.0 for m in union})
    written = {}
    with atomic_dir(out, overwrite=job.overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_lora_dir(placeholder, job, scratch / "peft")
        run_builder(job.base.resolve(), scratch / "peft", tmp.resolve(), scratch, precision, provider)
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
            "architecture": job.architecture, "model_type": job.model_type, "dtype": dtype,
            "provider": provider, "lora_modules": {m: list(s) for m, s in shapes.items()},
            "adapters": {n: {k: m[k] for k in ("file", "rank", "ranks", "modules")} for n, m in metas.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if provider == "cpu" or cuda_available():
            written = smoke_check(tmp, model, job.adapters, provider)
    for adapter in job.adapters:
        written.setdefault(adapter.name, {})["path"] = str(out / "adapters" / (adapter.name + SUFFIX))
    return written


@torch.no_grad()
def smoke_check(onnx_dir: Path, model, adapters: list[ExportedAdapter], provider: str) -> dict:
    """One session, every adapter in turn on random tokens: max |Δ logits| against torch
    (base + B A on each covered module) and the provider ORT actually used."""
    import onnxruntime as ort

    from svd_serve.model import LowRankDelta, attach, detach

    sess = ort.InferenceSession(str(onnx_dir / MODEL), session_options(), providers=providers(provider))
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    feed = prefill_feed(onnx_dir, sess, ids.numpy())
    out = {}
    for adapter in adapters:
        attach(model, {m: LowRankDelta(adapter.A[m], adapter.B[m]) for m in adapter.A})
        try:
            ref = model(input_ids=ids).logits.float().numpy()
        finally:
            detach(model)
        lora = ort.LoraAdapter()
        lora.Load(str(onnx_dir / "adapters" / (adapter.name + SUFFIX)))
        opts = ort.RunOptions()
        opts.add_active_adapter(lora)
        logits = sess.run(["logits"], feed, opts)[0].astype(np.float32)
        out[adapter.name] = {"onnx_max_logit_gap": float(np.abs(logits - ref).max()),
                             "provider": sess.get_providers()[0]}
    return out


# --- serving helpers ------------------------------------------------------------------------------------
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
    path = Path(onnx_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SvdServeError(f"{onnx_dir} is not an svd-serve ONNX export: no {MANIFEST}") from None
    except json.JSONDecodeError as e:
        raise SvdServeError(f"{path} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise SvdServeError(f"{path}: not an svd-serve ONNX manifest")
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
    import onnxruntime as ort

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
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:
        raise SvdServeError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    want = np.float16 if manifest["dtype"] == "float16" else np.float32
    for name, value in params.items():
        if name not in graph:
            raise SvdServeError(f"adapter {path.name} has module {name.rsplit('.lora_', 1)[0]}, "
                                f"which the graph in {onnx_dir} lacks")
        array = value.numpy()
        fixed = [d for d in graph[name] if isinstance(d, int)]
        if array.ndim != 2 or [array.shape[0 if name.endswith("lora_A.weight") else 1]] != fixed:
            raise SvdServeError(f"adapter {path.name}: {name} has shape {list(array.shape)}, "
                                f"the graph expects {graph[name]}")
        if array.dtype != want:
            raise SvdServeError(f"adapter {path.name}: {name} is {array.dtype}, the graph is {manifest['dtype']}")
    return path
