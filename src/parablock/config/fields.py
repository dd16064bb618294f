"""The machinery of the config tree: a field with its help and bounds (``opt``), per-client
values, and the checks and coercions every field goes through."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

from parablock.errors import ConfigError  # noqa: F401


def opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
    per_client: bool = False,
) -> Any:
    """A config field with its help text and constraints (checked by ``_validate``); a float is
    finite unless ``allow_inf``. A ``per_client`` field holds a tuple of floats: one value for
    every client, or one per client (``per_client_value`` picks a client's), each checked
    against the bounds."""
    meta = {
        "help": help,
        "choices": choices,
        "ge": ge,
        "gt": gt,
        "le": le,
        "allow_inf": allow_inf,
        "per_client": per_client,
    }
    if per_client:
        default = (float(default),)
    return field(default=default, metadata=meta)


PER_CLIENT = "one value for every client, or a comma list with one per client, e.g. '20,20,5'"


def per_client_value(values: tuple[float, ...], client: int) -> float:
    """Client ``client``'s value of a per-client setting (a single value is every client's)."""
    return values[0] if len(values) == 1 else values[client]


def per_client_text(values: tuple[float, ...]) -> str:
    """A per-client setting as a user would write it, for logs and messages: '20' or '20,20,5'."""
    return ",".join(f"{v:g}" for v in values)


def _per_client_plain(values: tuple[float, ...]) -> float | str:
    """A per-client setting as config.toml holds it, exactly: a number, or a comma list of
    exact numbers ('inf' included) in a string, which loads back to the same tuple."""
    return values[0] if len(values) == 1 else ",".join(repr(v) for v in values)


# torch.manual_seed takes at most 2**64 - 1 and numpy any size; a signed 64-bit bound also keeps
# the seed a TOML integer in config.toml (TOML integers are signed 64-bit), so --resume reads it.
MAX_SEED = 2**63 - 1


def _validate(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        value = getattr(obj, f.name)
        meta = f.metadata
        if not meta.get("per_client"):
            _check(key, key, value, meta)
            continue
        if not (isinstance(value, tuple) and value and all(type(v) is float for v in value)):
            raise ConfigError(f"{key} must be a tuple of floats, one per client, got {value!r}")
        for i, v in enumerate(value):
            _check(key, key if len(value) == 1 else f"{key}: client {i}'s value", v, meta)


def _check(key: str, name: str, value: Any, meta: Any) -> None:
    """One value against its field's constraints; ``name`` says whose value it is."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    if isinstance(value, float) and math.isinf(value) and not meta.get("allow_inf"):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; valid: {', '.join(choices)}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            shown = f"{name}={value!r}" if name == key else f"{name} {value!r}"
            raise ConfigError(f"{shown} is out of range; it must be {word} {_bound_text(b)}")


def _bound_text(b: float) -> str:
    """A bound as the user would type it: integers in full (a seed bound), floats short."""
    return str(b) if isinstance(b, int) else f"{b:g}"


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML value or a ``--set`` string to the field's type, or raise ConfigError."""
    if f.metadata.get("per_client"):
        return _per_client(key, value)
    kind = type(f.default)
    if kind is tuple:
        return _str_list(key, value)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    """A TOML array of strings, or a comma list in one string (as ``--set`` gives it)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(
            f"{key} expects a list of strings or a comma list in one string, got {value!r}"
        )
    return tuple(v.strip() for v in items if v.strip())


def _per_client(key: str, value: Any) -> tuple[float, ...]:
    """A number, a comma list of numbers in a string ('20,20,5', as ``--set`` gives it too) or
    a TOML array of numbers, as a tuple of floats (bounds and the count are checked later)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    out = []
    for item in items:
        try:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueError
            out.append(float(item))
        except ValueError:
            raise ConfigError(
                f"{key} expects a number or a comma list of numbers, one per client "
                f"(e.g. '20,20,5'), got {value!r}"
            ) from None
    if not out:
        raise ConfigError(f"{key} expects a number or a comma list of numbers, got {value!r}")
    return tuple(out)
