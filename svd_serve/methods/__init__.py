"""The method registry: adding a method is one file in this folder plus one line below."""

from __future__ import annotations

from ..errors import SvdServeError
from .base import Adapter, LoRAOptions, Options, RankOptions, opt
from .corda import CorDAIPA, CorDAKPA
from .delta import Delta
from .kasa import KaSA
from .kore import KORE
from .lora import LoRA
from .milora import MiLoRA
from .olora import OLoRA
from .pissa import PiSSA
from .salt import SALT
from .soma import SoMA
from .sorsa import SORSA
from .svf import SVF
from .svfit import SVFit

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "pissa": PiSSA,
    "milora": MiLoRA,
    "olora": OLoRA,
    "kasa": KaSA,
    "corda-ipa": CorDAIPA,
    "corda-kpa": CorDAKPA,
    "sorsa": SORSA,
    "svfit": SVFit,
    "svf": SVF,
    "salt": SALT,
    "soma": SoMA,
    "kore": KORE,
    "delta": Delta,
}
DEFAULT_METHOD = "kasa"


def get_method(name: str) -> type[Adapter]:
    try:
        return METHODS[name]
    except KeyError:
        raise SvdServeError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["DEFAULT_METHOD", "METHODS", "Adapter", "LoRAOptions", "Options", "RankOptions", "get_method", "opt"]
