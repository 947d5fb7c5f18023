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
  base (``linalg.minor_svd``).

The base is read one target weight at a time, and only where a module's ΔW needs it (re-derived
initial factors or dropped components); shapes come from the checkpoint's headers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .adapter import delta_adapter
from .weights import Weights, return_freed_memory
from .errors import SvdServeError
from .io import check_out
from .linalg import LowRank, minor_svd, top_svd


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
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SvdServeError(f"{cfg_file} is corrupt: {e}") from None
    if cfg.get("peft_type") != "LORA":
        raise SvdServeError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)")):
        if cfg.get(key):
            raise SvdServeError(f"{path}: {what} adapters are not supported (ΔW would not be low-rank or Linear)")
    if cfg.get("modules_to_save"):
        raise SvdServeError(f"{path}: modules_to_save {cfg['modules_to_save']} are not supported (full weights, not ΔW)")
    if (path / "adapter_model.safetensors").is_file():
        raw = load_file(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").is_file():
        raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise SvdServeError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in raw.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_diag)", key)
        if match is None:
            raise SvdServeError(f"{path}: tensor {key} is not supported (only lora_A, lora_B, lora_diag of Linear layers)")
        modules.setdefault(match[1], {})[match[2].split(".")[0]] = value.float()
    for name, parts in modules.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise SvdServeError(f"{path}: module {name} lacks lora_A or lora_B")
    return cfg, modules


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
    q, rr = torch.linalg.qr(weight.float())
    return LowRank(rr[:r], q[:, :r])


def module_delta(cfg: dict, name: str, parts: dict[str, Tensor], shape: tuple[int, int],
                 weight: Callable[[], Tensor], initial: dict[str, Tensor] | None) -> LowRank:
    """Module ``name``'s exact ΔW; ``weight()`` reads its original base weight (float32) when needed."""
    a, b = parts["lora_A"], parts["lora_B"]
    r = a.shape[0]
    s = scaling(cfg, name)
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


def import_peft(path: str | Path, base: str | Path, out: str | Path,
                initial: str | Path | None = None, overwrite: bool = False) -> dict:
    """PEFT adapter at ``path`` (trained on ``base``) → native adapter at ``out``; returns a report."""
    inputs = [path, base, initial]
    check_out(out, inputs, overwrite)
    cfg, modules = read_peft(path)
    init = cfg.get("init_lora_weights", True)
    kasa = cfg.get("kasa_config") is not None
    if not kasa and init not in PLAIN_INITS and init not in RESIDUAL_INITS and not str(init).startswith("pissa"):
        raise SvdServeError(f"init_lora_weights={init!r} is not supported"
                            + (" (LoftQ quantizes the base: ΔW against the original base is unknown)"
                               if init == "loftq" else ""))
    init_modules = read_peft(initial)[1] if initial is not None else None
    return_freed_memory()
    ckpt = Weights(base)
    linear = [n for n, m in ckpt.named_modules() if isinstance(m, nn.Linear)]
    factors = {}
    for name, parts in modules.items():
        if name not in linear:
            raise SvdServeError(f"module {name} of the PEFT adapter is not a Linear layer of this base")
        if init_modules is not None and name not in init_modules:
            raise SvdServeError(f"module {name} is missing from the --initial adapter")
        factors[name] = module_delta(cfg, name, parts, ckpt.weight_info(name).shape,
                                     lambda name=name: ckpt.weight(name).float(),
                                     init_modules[name] if init_modules is not None else None)
    order = [n for n in linear if n in factors]
    adapters = delta_adapter({n: factors[n] for n in order}, ckpt.architecture, ckpt.fingerprint(order), str(base))
    adapters.save(out, inputs, overwrite)
    kind = "kasa" if kasa else ("lora" if init in PLAIN_INITS else str(init))
    return {"kind": kind, "modules": len(order), "rank": adapters.config.options["rank"], "out": str(out)}
