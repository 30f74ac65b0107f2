"""One way to configure a program: a typed dataclass, checked field by field.

Every configuration in the project (scan, watch, scoring rules, reports, training) is a
dataclass whose fields say their type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``tuple[str, ...]``, ``X | None``, a nested dataclass) and, in ``field(metadata=...)``, their
range (``min``, ``max``, ``gt`` for a strict lower bound). :func:`load_dataclass` builds one
from a TOML table (unknown keys and wrong types are errors that name the key), and
:func:`validate` is called from each dataclass's ``__post_init__`` so that a configuration
built in code is checked the same way. A typo therefore fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type or out of range."""


def bounded(default: Any, *, min: float | None = None, max: float | None = None, gt: float | None = None,
            help: str = "") -> Any:
    """A dataclass field with a range: ``x: int = bounded(8, min=1)``."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("help", help)) if v not in (None, "")}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata=meta)


def read_toml(path: Path | str) -> dict:
    """A TOML file as a dict; ConfigError names the file and the problem."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None


# options that only a command line gives: where the results go and what to do with earlier ones
COMMAND_LINE_ONLY = ("out", "resume", "overwrite", "quiet", "debug", "config")


def _meant(unknown: list[str], known) -> str:
    """" (did you mean 'urgent'?)" for a misspelt name, "" when none is close."""
    close = [c for name in unknown for c in difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)]
    return f" (did you mean {' or '.join(map(repr, dict.fromkeys(close)))}?)" if close else ""


def check_tables(data: Mapping, known: tuple[str, ...], where: str, options: Mapping[str, str] | None = None) -> None:
    """Top-level tables of a shared configuration file: each program reads its own, and a table
    nobody reads is a typo. ``options``: {option: its table} of the program reading the file, so
    an option written above any table is said to belong in its table."""
    unknown = sorted(set(data) - set(known))
    misplaced = [name for name in unknown if name in (options or {})]
    if misplaced:
        name = misplaced[0]
        raise ConfigError(f"{where}: {name!r} is an option of [{options[name]}]: write it below a [{options[name]}] "
                          f"line (a key above every table is in none)")
    if unknown:
        raise ConfigError(f"{where}: unknown table or key {', '.join(map(repr, unknown))}{_meant(unknown, known)}; "
                          f"known tables: {', '.join(known)}")
    for name in known:  # "scan = 8": read as its table, it ended in a TypeError traceback
        if name in data and not isinstance(data[name], Mapping):
            raise ConfigError(f"{where}: {name!r} is a table ([{name}], its options on the lines below it), not "
                              f"{type(data[name]).__name__}")


def load_dataclass(cls: type[T], table: Mapping | None, where: str = "", **overrides) -> T:
    """Build ``cls`` from ``table`` (a TOML table) and ``overrides`` (e.g. command-line options;
    None means "not given"). Lists become tuples, nested tables nested dataclasses; unknown keys,
    wrong types and out-of-range values raise ConfigError naming the key."""
    where = where or cls.__name__
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table of options, got {type(table).__name__}")
    data = {**table, **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(names))
    for name in unknown:  # copied from a command line: say how it is given instead
        if name in COMMAND_LINE_ONLY:
            raise ConfigError(f"{where}: {name!r} is given on the command line (--{name.replace('_', '-')}), not "
                              f"in a configuration file")
        if name.startswith("no_") and name[3:] in names:  # --no-pdf
            raise ConfigError(f"{where}: unknown option {name!r}: write {name[3:]} = false for "
                              f"--{name.replace('_', '-')}")
    if unknown:
        raise ConfigError(f"{where}: unknown option {', '.join(map(repr, unknown))}{_meant(unknown, names)}; "
                          f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def validate(obj: Any, where: str = "") -> None:
    """Check every field of a dataclass instance against its type and range (call it from
    ``__post_init__``). Raises ConfigError naming the field."""
    where = where or type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}"
        coerced = _coerce(value, hints[f.name], key)
        if coerced is not value and not dataclasses.is_dataclass(value):
            object.__setattr__(obj, f.name, coerced)  # e.g. a list given for a tuple field
        _check_range(coerced, f.metadata, key)


def _check_range(value: Any, meta: Mapping, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key} = {value!r}: must be at least {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key} = {value!r}: must be at most {meta['max']}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"{key} = {value!r}: must be greater than {meta['gt']}")


_PLURAL = {int: "integers", float: "numbers", bool: "true or false values", str: "strings"}  # "a list of strings"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _PLURAL.get(args[0], _describe(args[0])) if args else "values"
        return f"a list of {inner}" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} values"
    if dataclasses.is_dataclass(tp):
        return f"a table ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` or ConfigError. Only lossless conversions: list -> tuple,
    int -> float, table -> dataclass."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)} (e.g. [\"a\", \"b\"])")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} = {_show(value)}: expected {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {_show(value)}: expected a table")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return load_dataclass(tp, value, key)
        raise ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {_show(value)}: must be a finite number")
            return float(value) if isinstance(value, int) else value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_plain(obj: Any) -> Any:
    """A dataclass (nested) as JSON-ready values: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
