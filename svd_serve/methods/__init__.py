"""The method registry, by each class's ``name``: adding a method is one file in this folder plus
its class in the list below."""

from __future__ import annotations

from ..errors import SvdServeError
from .base import Adapter, LoRAOptions, Options, RankOptions, opt
from .codyra import CoDyRA
from .corda import CorDAIPA, CorDAKPA
from .delta import Delta
from .diffora import DiffoRA
from .kasa import KaSA
from .kore import KORE
from .loku import LoKU
from .lora import LoRA
from .milora import MiLoRA
from .olora import OLoRA
from .osft import OSFT
from .pissa import PiSSA
from .salt import SALT
from .soma import SoMA
from .sorsa import SORSA
from .sst import SST
from .svf import SVF
from .svfit import SVFit

METHODS: dict[str, type[Adapter]] = {cls.name: cls for cls in (
    LoRA, PiSSA, MiLoRA, OLoRA, KaSA, CorDAIPA, CorDAKPA, SORSA, SVFit, SVF, SALT, SoMA, KORE, LoKU, DiffoRA,
    Delta, CoDyRA, SST, OSFT)}
DEFAULT_METHOD = "kasa"


def get_method(name: str) -> type[Adapter]:
    try:
        return METHODS[name]
    except KeyError:
        raise SvdServeError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["DEFAULT_METHOD", "METHODS", "Adapter", "LoRAOptions", "Options", "RankOptions", "get_method", "opt"]
