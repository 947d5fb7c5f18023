"""One schema for every typed setting: a dataclass whose fields are declared with :func:`opt`.

A field's type annotation, default and :func:`opt` metadata (what it does, its valid values) are
its whole schema; parsing a string (``-o KEY=VALUE``, a YAML value), checking type, finiteness,
choices and bounds, the error messages, and the help texts of ``svd-serve methods`` and of the
command-line flags are derived from it, here and nowhere else. Two families use it:

- :class:`Options`, a method's options (``-o KEY=VALUE``): checked on construction, named
  ``option NAME`` in messages, bounds as symbols (``option rank must be >= 1, not 0``);
- :class:`Settings`, the settings of a command (``TrainConfig``; a command's arguments): checked
  by :meth:`Settings.check` when the command runs, a wrong type named ``option NAME`` as in a
  config file, a value out of range named by its flag (``--steps must be at least 1, not 0``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .errors import SvdServeError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}
_WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, reg: bool = False, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        choices: tuple[str, ...] | None = None, why: str = "", path: bool = False,
        parse: Callable[[Any], Any] | None = None, want: str = "", factory: Callable[[], Any] | None = None,
        flag: str | tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """One setting: its default (none: it must be given; ``factory`` for a mutable one), what it
    does (``doc``: the help text), and its valid values: ``ge`` ≤ value, ``gt`` < value, value ≤
    ``le``, value < ``lt``; a string: one of ``choices``. ``why`` follows a bound's message.
    ``reg=True`` marks a regularizer weight (``--reg`` takes only these). ``path``: a file or
    directory (a string or ``os.PathLike``). ``parse``: a value of its own kind, parsed (and
    refused with a :class:`SvdServeError`) by that function; ``want`` says what it takes.
    ``flag``/``metavar``: the command-line spelling where it is not ``--name`` (a click
    declaration such as ``"--absorb-frozen/--no-absorb-frozen"``)."""
    metadata = {"doc": doc, "reg": reg, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "why": why,
                "path": path, "parse": parse, "want": want, "flag": flag, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_kind(cls: type, name: str) -> tuple[type | None, bool]:
    """``(bool | int | float | str, or None for any other type; whether None is allowed)`` of a
    dataclass field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    kind = kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str, dict) else None
    return kind, len(kinds) < len(args)


def parse_value(kind: type, optional: bool, name: str, raw: Any) -> Any:
    """``raw`` as a ``kind`` if it is a string (``none`` → None where allowed); other values, and
    strings for a ``str`` field, pass through."""
    if not isinstance(raw, str) or kind not in (bool, int, float):
        return raw
    text = raw.strip().lower()
    if optional and text == "none":
        return None
    if kind is bool:
        if text not in _TRUE + _FALSE:
            raise SvdServeError(f"option {name} is true or false, not {raw!r}")
        return text in _TRUE
    try:
        return kind(raw)
    except ValueError:
        raise SvdServeError(f"option {name} must be {_a(kind)}, not {raw!r}") from None


def _a(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping of KEY: VALUE or a list of KEY=VALUE strings"}[kind]


def _number(x: float) -> str:
    """A bound as a message shows it: ``2**32`` for a large power of two, else ``%g``."""
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}"


class Schema:
    """What both families share: the fields, their kinds, parsing and the value checks. Subclasses
    are dataclasses; :meth:`subject` and :meth:`violation` phrase the messages."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def kind(cls, name: str) -> tuple[type | None, bool]:
        """``(bool | int | float | str | dict, or None; whether None is allowed)`` of field ``name``."""
        return field_kind(cls, name)

    @classmethod
    def parse(cls, name: str, raw: Any) -> Any:
        """The value of field ``name`` from a command-line or YAML string (typed values pass through)."""
        if cls.fields()[name].metadata.get("parse") is not None:
            return raw
        return parse_value(*cls.kind(name), name, raw)

    @classmethod
    def typed(cls, name: str, value: Any) -> Any:
        """``value`` parsed by field ``name``'s type (an int taken as a float), or an error naming the
        field when it has another type; no range check."""
        f, (kind, optional) = cls.fields()[name], cls.kind(name)
        custom = f.metadata.get("parse")
        if custom is not None:
            try:
                custom(value)
            except SvdServeError:
                raise SvdServeError(f"option {name} must be {f.metadata['want']}, not {value!r}") from None
            return value
        value = parse_value(kind, optional, name, value)
        if value is None:
            if optional or kind is dict:
                return None
            raise SvdServeError(cls.missing(name, kind))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _has_kind(f, kind, value):
            want = "a path" if f.metadata.get("path") else _a(kind) if kind is not None else "a string"
            raise SvdServeError(f"option {name} must be {want}, not {value!r}")
        return value

    @classmethod
    def checked(cls, name: str, value: Any) -> Any:
        """:meth:`typed`, then the field's choices and bounds."""
        value = cls.typed(name, value)
        f, (kind, _) = cls.fields()[name], cls.kind(name)
        choices = f.metadata.get("choices")
        if value is not None and choices and value not in choices:
            raise SvdServeError(f"{cls.subject(name)} must be one of {', '.join(choices)}, not {value!r}")
        if value is not None and kind in (int, float) and f.metadata.get("parse") is None:
            broken = cls.violation(f, kind, value)
            if broken:
                raise SvdServeError(f"{cls.subject(name)} {broken}")
        return value

    @classmethod
    def subject(cls, name: str) -> str:
        return f"option {name}"

    @classmethod
    def missing(cls, name: str, kind: type | None) -> str:
        return f"option {name} needs a value ({kind.__name__})"

    @classmethod
    def violation(cls, f: dataclasses.Field, kind: type, value: float) -> str | None:
        """What ``value`` fails of the field's rules, as the message says it (None: it holds)."""
        if kind is float and not math.isfinite(value):
            return f"must be finite, not {value}"
        for key, (holds, sign) in _BOUNDS.items():
            bound = f.metadata.get(key)
            if bound is not None and not holds(value, bound):
                return f"must be {sign} {_number(bound)}, not {value:g}"
        return None


def _has_kind(f: dataclasses.Field, kind: type | None, value: Any) -> bool:
    if f.metadata.get("path"):
        return isinstance(value, (str, os.PathLike))
    if kind is dict:
        return isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if kind is None:
        return isinstance(value, str)
    return isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))


@dataclass
class Options(Schema):
    """Base of every method's options (no fields: a method without options, such as ``svf``).

    Values are checked on construction: type (an int is accepted for a float), finiteness, range."""

    def __post_init__(self) -> None:
        for name in self.fields():
            if self.kind(name)[0] in (None, dict):
                raise TypeError(f"{type(self).__name__}.{name}: an option is a bool, int, float or str (or None)")
            setattr(self, name, self.checked(name, getattr(self, name)))

    @classmethod
    def regularizer_weights(cls) -> list[str]:
        return [name for name, f in cls.fields().items() if f.metadata.get("reg")]

    @classmethod
    def from_dict(cls, values: dict, method: str) -> "Options":
        """The options from ``values`` (strings are parsed); a key the method does not have is refused."""
        fields = cls.fields()
        unknown = sorted(set(values) - set(fields))
        if unknown:
            has = f"its options: {', '.join(fields)}" if fields else "it has none"
            raise SvdServeError(f"method {method} has no option {', '.join(unknown)} ({has}; see "
                                f"`svd-serve methods {method}`)")
        try:
            return cls(**{k: cls.parse(k, v) for k, v in values.items()})
        except SvdServeError as e:
            raise SvdServeError(f"{method}: {e}") from None


@dataclass
class Settings(Schema):
    """Base of a command's settings, each field one flag ``--name-with-dashes`` (or its ``flag``),
    its ``doc`` the flag's help text. A library caller may build one with values of any type: they
    are parsed and checked, as a config file's are, by :meth:`check` when the command runs."""

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def subject(cls, name: str) -> str:
        return cls.flag(name)

    @classmethod
    def missing(cls, name: str, kind: type | None) -> str:
        return f"option {name} must be {_a(kind) if kind is not None else 'a string'}, not None"

    @classmethod
    def violation(cls, f: dataclasses.Field, kind: type, value: float) -> str | None:
        """Flags say bounds in words: ``at least 1`` (an integer), ``a finite number > 0`` (a number
        with one bound), ``in (0, 1)`` (a number between two); ``why`` follows."""
        bounds = {k: f.metadata[k] for k in _BOUNDS if f.metadata.get(k) is not None}
        why = f" {f.metadata['why']}" if f.metadata.get("why") else ""
        if kind is int:
            for key, bound in bounds.items():
                if not _BOUNDS[key][0](value, bound):
                    return f"must be {_WORDS[key]} {_number(bound)}, not {value}{why}"
            return None
        if math.isfinite(value) and all(_BOUNDS[k][0](value, b) for k, b in bounds.items()):
            return None
        lower = [(k, b) for k, b in bounds.items() if k in ("ge", "gt")]
        upper = [(k, b) for k, b in bounds.items() if k in ("le", "lt")]
        if lower and upper:
            (lk, lb), (uk, ub) = lower[0], upper[0]
            interval = f"{'[' if lk == 'ge' else '('}{_number(lb)}, {_number(ub)}{']' if uk == 'le' else ')'}"
            return f"must be in {interval}, not {value}{why}"
        signs = "".join(f" {_BOUNDS[k][1]} {_number(b)}" for k, b in bounds.items())
        return f"must be a finite number{signs}, not {value}{why}"

    def check(self) -> None:
        """Parse and check every field in place (the first bad value is refused)."""
        for name in self.fields():
            setattr(self, name, self.checked(name, getattr(self, name)))

    @classmethod
    def from_mapping(cls, values: dict, source: str) -> dict:
        """A config file's ``values`` (keys with dashes or underscores), each parsed and type-checked
        by its field (:meth:`typed`; ranges are checked with the flags, by :meth:`check`); an unknown
        key is refused. Errors are prefixed with ``source``."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise SvdServeError(f"{source}: unknown option(s) {', '.join(unknown)}")
        try:
            return {key: cls.typed(key, value) for key, value in values.items()}
        except SvdServeError as e:
            raise SvdServeError(f"{source}: {e}") from None

    @classmethod
    def help(cls, name: str) -> str:
        return cls.fields()[name].metadata.get("doc", "")
