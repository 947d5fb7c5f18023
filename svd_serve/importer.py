"""``svd-serve import --from peft``: a PEFT LoRA-family adapter → a native ``delta`` adapter holding
its exact ΔW against the ORIGINAL base, which every export target accepts.

Per module, with PEFT's scale ``s = α/r`` (``α/√r`` with rsLoRA; ``rank_pattern``/``alpha_pattern``
honoured):

- LoRA (and inits that leave the base alone: gaussian, eva, mica, orthogonal): ``ΔW = s·B A``;
- PiSSA / OLoRA / CorDA / LoRA-GA: PEFT trained ``A, B`` against the residual base ``W − s·B0 A0``,
  so ``ΔW = s·(B A − B0 A0)``. ``B0, A0`` come from ``--initial`` (the adapter PEFT saved before
  training) or, for ``pissa`` (exact SVD) and ``olora``, are re-derived from the original base
  exactly as PEFT's init does;
- KaSA (``kasa_config``): PEFT truncated the base's r smallest singular components, so
  ``ΔW = s·B diag(d) A − U_t diag(σ_t) V_tᵀ`` with the dropped part re-derived from the original
  base (``linalg.minor_svd``);
- DoRA (``use_dora``): ``W' = diag(m / ‖V‖) V`` with ``V = W + s·B A``, ``m`` the magnitude vector and
  ``‖V‖`` the norm of each output row, as PEFT computes it; ``ΔW = W' − W`` rescales W's rows and is
  full rank in general. It is computed exactly (float64) and written as its best rank-K approximation
  (``--max-rank K``, default :func:`dora_rank`; ``--weighting``/``--calib-data`` as in ``export``),
  with every module's error reported: vLLM serves LoRA, not DoRA.

A LoRA on the output head (``lm_head``) is imported where the base does not tie the head to the input
embeddings (a ΔW on a tied head would change the embeddings too) and the head copy PEFT saves beside
it is the base's own.

The base is read one target weight at a time, and only where a module's ΔW needs it (re-derived
initial factors or dropped components); shapes come from the checkpoint's headers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .adapter import delta_adapter
from .calib import check_weighting, lower_rank, module_errors, truncation_weights
from .weights import Weights, return_freed_memory
from .errors import SvdServeError
from .files import check_finite, check_out
from .hub import resolve
from .linalg import LowRank, leading_qr, minor_svd, top_svd


PREFIX = "base_model.model."
PLAIN_INITS = (True, False, "gaussian", "eva", "mica", "orthogonal")
RESIDUAL_INITS = ("olora", "corda", "lora_ga")  # and pissa, pissa_niter_<k>


def read_peft(path: str | Path) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """``(adapter_config, {module: {"lora_A": A, "lora_B": B, "lora_diag": d}})``."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        hint = " (it is an svd-serve adapter already)" if (path / "svd_adapter.json").is_file() else ""
        raise SvdServeError(f"{path} is not a PEFT adapter: no adapter_config.json{hint}")
    try:
        cfg = json.loads(cfg_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SvdServeError(f"{cfg_file} is corrupt: {e}") from None
    if not isinstance(cfg, dict):
        raise SvdServeError(f"{cfg_file} is corrupt: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise SvdServeError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    for key, what in (("lora_bias", "LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)")):
        if cfg.get(key):
            raise SvdServeError(f"{path}: {what} adapters are not supported (ΔW would not be low-rank or Linear)")
    if cfg.get("modules_to_save"):
        raise SvdServeError(f"{path}: modules_to_save {cfg['modules_to_save']} are not supported (full weights, not ΔW)")
    check_scale_config(cfg, cfg_file)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        file = path / name
        if file.is_file():
            try:
                raw = (load_file(file) if name.endswith(".safetensors")
                       else torch.load(file, map_location="cpu", weights_only=True))
            except Exception as e:  # several types for truncated or corrupt files
                raise SvdServeError(f"cannot read {file}: {str(e).splitlines()[0]} (truncated or corrupt)") from None
            break
    else:
        raise SvdServeError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise SvdServeError(f"{file} is not a mapping of tensor names to tensors")
    check_finite(raw.items(), f"the PEFT adapter {file} is corrupt")
    modules: dict[str, dict[str, Tensor]] = {}
    copies = [k for k in raw if k.endswith(".base_layer.weight")]  # PEFT's save_embedding_layers
    for key, value in raw.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_diag"
                             r"|lora_magnitude_vector(?:\.weight)?)", key)
        if match is None and key not in copies:
            raise SvdServeError(f"{path}: {unsupported(key, cfg)}")
        if match is not None:
            part = "magnitude" if match[2].startswith("lora_magnitude") else match[2].split(".")[0]
            modules.setdefault(match[1], {})[part] = value.float()
    for key in copies:  # beside a LoRA: checked with its module, later (an untied head's is the base's); alone: refused
        name = key.removeprefix(PREFIX).removesuffix(".base_layer.weight")
        if name not in modules:
            raise SvdServeError(f"{path}: {unsupported(key, cfg)}")
        modules[name]["copy"] = raw[key]
    for name, parts in modules.items():
        if "magnitude" in parts and not cfg.get("use_dora"):
            raise SvdServeError(f"{path}: tensor {name}.lora_magnitude_vector is not supported (a DoRA magnitude "
                                "vector, but adapter_config.json does not set use_dora)")
        if "lora_A" not in parts or "lora_B" not in parts:
            raise SvdServeError(f"{path}: module {name} lacks lora_A or lora_B")
        if cfg.get("use_dora") and "magnitude" not in parts:
            raise SvdServeError(f"{path}: DoRA adapter (use_dora) without the magnitude vector of module {name}")
    return cfg, modules


def unsupported(key: str, cfg: dict) -> str:
    """Why tensor ``key`` of a PEFT adapter cannot be imported, in words."""
    name = key.removeprefix(PREFIX)
    if ".lora_embedding_" in name:
        return (f"module {name.split('.lora_embedding_')[0]} is an embedding with a LoRA: svd-serve imports LoRA "
                "on Linear layers only (an embedding update is a lookup table, not a W + B A of a Linear)")
    if name.endswith(".bias"):
        return (f"the adapter trains biases (bias={cfg.get('bias')!r}; tensor {name}): a bias update is not a "
                "low-rank weight update and no LoRA export carries it; train with bias=\"none\"")
    if name.endswith(".base_layer.weight"):
        return (f"the adapter carries a full copy of {name.removesuffix('.base_layer.weight')} (PEFT saves one "
                "for embedding and output-head LoRAs): svd-serve imports LoRA on Linear layers and an untied "
                "output head only")
    return f"tensor {name} is not supported (only lora_A, lora_B, lora_diag of Linear layers)"


def check_scale_config(cfg: dict, cfg_file: Path) -> None:
    """``r`` and ``lora_alpha`` (and their patterns) must be there and be finite numbers: they set ΔW's scale."""
    for key, kind, pattern in (("r", int, "rank_pattern"), ("lora_alpha", (int, float), "alpha_pattern")):
        if key not in cfg:
            raise SvdServeError(f"{cfg_file} has no {key!r}: the scale of ΔW (lora_alpha / r) is unknown")
        if not isinstance(cfg.get(pattern) or {}, dict):
            raise SvdServeError(f"{cfg_file}: {pattern} must be a mapping of module names to values")
        values = [cfg[key], *(cfg.get(pattern) or {}).values()]
        for v in values:
            if not isinstance(v, kind) or isinstance(v, bool) or not math.isfinite(v) or (key == "r" and v < 1):
                raise SvdServeError(f"{cfg_file}: {key} must be {'a positive integer' if key == 'r' else 'a finite number'}"
                                    f", not {v!r}")


def pattern_value(pattern: dict, name: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def scaling(cfg: dict, name: str) -> float:
    r = pattern_value(cfg.get("rank_pattern"), name, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
    return alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r


def initial_factors(init, weight: Tensor, r: int, s: float) -> LowRank:
    """PEFT's ``(A0, B0)`` for pissa (exact SVD) and olora, re-derived from the original weight."""
    if init == "pissa":
        return LowRank.from_svd(*top_svd(weight, r), scale=s)
    q, rr = leading_qr(weight, r)
    return LowRank(rr, q)


def module_delta(cfg: dict, name: str, parts: dict[str, Tensor], shape: tuple[int, int],
                 weight: Callable[[], Tensor], initial: dict[str, Tensor] | None) -> LowRank:
    """Module ``name``'s exact ΔW; ``weight()`` reads its original base weight (float32) when needed."""
    a, b = parts["lora_A"], parts["lora_B"]
    r = a.shape[0]
    s = scaling(cfg, name)
    if r != pattern_value(cfg.get("rank_pattern"), name, cfg["r"]):
        raise SvdServeError(f"module {name}: lora_A has rank {r}, adapter_config.json says r = "
                            f"{pattern_value(cfg.get('rank_pattern'), name, cfg['r'])}: the files do not belong together")
    if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(shape) or b.shape[1] != r:
        raise SvdServeError(f"module {name}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not "
                            f"match the base weight {list(shape)}: the adapter belongs to another base")
    if cfg.get("kasa_config") is not None:
        if "lora_diag" not in parts:
            raise SvdServeError(f"module {name}: KaSA adapter without lora_diag")
        us, _, vh = minor_svd(weight(), r)
        return LowRank(torch.cat([a, vh]), torch.cat([b * (parts["lora_diag"] * s), -us], 1))
    init = cfg.get("init_lora_weights", True)
    if init in PLAIN_INITS:
        return LowRank(a, b * s)
    if initial is not None:
        if initial["lora_A"].shape != a.shape or initial["lora_B"].shape != b.shape:
            raise SvdServeError(f"module {name}: the --initial adapter's shapes differ from the trained one")
        a0, b0 = initial["lora_A"], initial["lora_B"]
    elif init in ("pissa", "olora"):
        a0, b0 = initial_factors(init, weight(), r, s)
    else:
        raise SvdServeError(f"init_lora_weights={init!r} cannot be re-derived from the base "
                            f"(randomized or data-dependent): give --initial, the adapter PEFT saved before training")
    return LowRank(torch.cat([a, a0]), torch.cat([b * s, b0 * -s], 1))


def check_head(ckpt: Weights, name: str, parts: dict[str, Tensor]) -> None:
    """A LoRA on the output head is imported where the head is untied and the adapter's copy of the
    head (PEFT saves one) is the base's own."""
    if getattr(ckpt.config, "tie_word_embeddings", True):
        raise SvdServeError(f"module {name} of the PEFT adapter is the output head, which this base ties to the "
                            "input embeddings (tie_word_embeddings): a ΔW on it would change the embeddings too; "
                            "fold it with PEFT's merge_and_unload")
    copy = parts.get("copy")
    if copy is not None and not torch.equal(copy.float(), ckpt.weight(name).float()):
        raise SvdServeError(f"module {name}: the adapter's copy of the output head differs from the base's: "
                            "the adapter belongs to another base (or changed the head)")


def dora_delta(weight: Tensor, parts: dict[str, Tensor], s: float) -> Tensor:
    """DoRA's exact ``ΔW = diag(m / ‖V‖) V − W``, ``V = W + s·B A``, ``‖V‖`` per output row (float64)."""
    w = weight.double()
    v = w + s * (parts["lora_B"].double() @ parts["lora_A"].double())
    return (parts["magnitude"].double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v - w


def dora_rank(r: int) -> int:
    """The default ``--max-rank`` of a DoRA import: ``2r``. ``r`` components hold ``s·B A`` (rescaled);
    the rest of ΔW, the row rescaling ``diag(m/‖V‖ − 1) W``, is full rank with a slowly decaying
    spectrum, so each further component buys little: ``r`` more take its largest part at twice the
    adapter's serving rank (a vLLM ``--max-lora-rank`` value for every power-of-two ``r``)."""
    return 2 * r


def check_dora(cfg: dict, modules: dict[str, dict[str, Tensor]], max_rank: int | None) -> None:
    """What a DoRA import cannot take: a rank below 1, an init that changed the base, a magnitude
    vector of the wrong length."""
    if max_rank is not None and max_rank < 1:
        raise SvdServeError(f"--max-rank must be at least 1, not {max_rank}")
    init = cfg.get("init_lora_weights", True)
    if cfg.get("kasa_config") is not None or init not in PLAIN_INITS:
        raise SvdServeError(f"DoRA with {'KaSA' if cfg.get('kasa_config') else f'init_lora_weights={init!r}'} "
                            "is not supported (only DoRA on an unchanged base)")
    for name, parts in modules.items():
        if parts["magnitude"].shape != parts["lora_B"].shape[:1]:
            raise SvdServeError(f"module {name}: the DoRA magnitude vector has shape {list(parts['magnitude'].shape)}, "
                                f"lora_B has {parts['lora_B'].shape[0]} output rows: the adapter is corrupt")


def import_peft(path: str | Path, base: str | Path, out: str | Path,
                initial: str | Path | None = None, overwrite: bool = False, max_rank: int | None = None,
                weighting: str = "none", calib_data: str | Path | None = None, revision: str | None = None,
                adapter_revision: str | None = None) -> dict:
    """PEFT adapter at ``path`` (trained on ``base``) → native adapter at ``out``; returns a report.
    ``path`` and ``base`` (and ``initial``): local directories or Hugging Face Hub ids, at
    ``adapter_revision`` and ``revision`` (:mod:`svd_serve.hub`).

    ``max_rank``, ``weighting`` and ``calib_data`` are for DoRA adapters (module docstring): with
    ``calib_data`` the truncation statistics are those of the base with DoRA's exact ΔW added
    (:func:`svd_serve.calib.truncation_weights`; loads the model), and every module's output error on
    those rows is reported."""
    source = resolve(base, revision)
    path = resolve(path, adapter_revision, kind="adapter", flag="--adapter-revision").path
    base = source.path
    initial = resolve(initial, kind="adapter").path if initial is not None else None
    inputs = [path, base, initial, calib_data]
    check_out(out, inputs, overwrite)
    cfg, modules = read_peft(path)
    init = cfg.get("init_lora_weights", True)
    kasa = cfg.get("kasa_config") is not None
    dora = bool(cfg.get("use_dora"))
    if not dora and (max_rank is not None or calib_data is not None or weighting != "none"):
        raise SvdServeError("--max-rank, --weighting and --calib-data are for DoRA adapters (a full-rank ΔW); "
                            "this adapter imports exactly: lower its rank at export with --max-rank")
    if dora:
        check_dora(cfg, modules, max_rank)
        check_weighting(weighting, calib_data, True)
    if not kasa and init not in PLAIN_INITS and init not in RESIDUAL_INITS and not str(init).startswith("pissa"):
        raise SvdServeError(f"init_lora_weights={init!r} is not supported"
                            + (" (LoftQ quantizes the base: ΔW against the original base is unknown)"
                               if init == "loftq" else ""))
    init_modules = read_peft(initial)[1] if initial is not None else None
    return_freed_memory()
    ckpt = Weights(base)
    linear = {n: m for n, m in ckpt.named_modules() if isinstance(m, nn.Linear)}
    head = ckpt.skeleton.get_output_embeddings()
    factors = {}
    for name, parts in modules.items():
        if name not in linear:
            raise SvdServeError(f"module {name} of the PEFT adapter is not a Linear layer of this base")
        if linear[name] is head:
            check_head(ckpt, name, parts)
        elif "copy" in parts:
            raise SvdServeError(f"{path}: {unsupported(name + '.base_layer.weight', cfg)}")
        if init_modules is not None and name not in init_modules:
            raise SvdServeError(f"module {name} is missing from the --initial adapter")
        shape = ckpt.weight_info(name).shape
        if dora:
            module_delta(cfg, name, parts, shape, lambda: None, None)  # the rank and shape checks
            factors[name] = LowRank.of_dense(dora_delta(ckpt.weight(name), parts, scaling(cfg, name)))
            continue
        factors[name] = module_delta(cfg, name, parts, shape, lambda name=name: ckpt.weight(name).float(),
                                     init_modules[name] if init_modules is not None else None)
    order = [n for n in linear if n in factors]
    report = {}
    if dora:
        factors, report = truncate_dora(cfg, {n: factors[n] for n in order}, base, max_rank, weighting, calib_data)
    adapters = delta_adapter({n: factors[n] for n in order}, ckpt.architecture, ckpt.fingerprint(order), source.name)
    adapters.save(out, inputs, overwrite)
    kind = "dora" if dora else "kasa" if kasa else ("lora" if init in PLAIN_INITS else str(init))
    return {"kind": kind, "modules": len(order), "rank": adapters.config.options["rank"], "out": str(out), **report}


def truncate_dora(cfg: dict, deltas: dict[str, LowRank], base: str | Path, max_rank: int | None, weighting: str,
                  calib_data: str | Path | None) -> tuple[dict[str, LowRank], dict]:
    """Each DoRA module's exact ΔW at its rank (``max_rank``, else :func:`dora_rank` of its ``r``), in
    the weighting of ``calib_data``; the factors and the report's errors."""
    stats = truncation_weights(weighting, calib_data, base, list(deltas), deltas)
    lowered = {}
    for name, delta in deltas.items():
        rank = max_rank or dora_rank(pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
        lowered[name] = lower_rank(stats, name, delta, rank)
    errors = module_errors(lowered)
    worst = max(errors, key=lambda n: errors[n][0])
    report = {"max_rank": max_rank or "2r", "weighting": weighting, "errors": errors, "worst": worst,
              "max_rel_error": errors[worst][0], "calibrated": stats is not None}
    if stats is not None:
        report["max_output_error"] = max(e[1] for e in errors.values())
    return {n: c.factors.float() for n, c in lowered.items()}, report
